"""wisca_cli.transition on live models: plain tensors here, FSDP2 under torchrun in
test_live_fsdp; the function, the moments and the gradients carried over bit for bit."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import wisca_cli as wisca
from conftest import ARCH_FAMILIES, FUSED_ON_DISK, REPO, eval_logits, make_config, unbalance

from wisca_cli import live


def _llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                             attn_implementation="eager")
    unbalance(model)
    return model


def _family(arch_ckpt, family: str):
    """A skewed checkpoint of the family (saved as ``save_pretrained`` writes it: a Mixtral
    per expert), loaded by transformers 5 (the Mixtral's experts fused in 3-D parameters)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(arch_ckpt(family), dtype=torch.float32, attn_implementation="eager")


LIVE_FAMILIES = ["llama"] + [f for f in ARCH_FAMILIES if f not in FUSED_ON_DISK]


BATCH = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _trained(model):
    """One AdamW step, and a gradient left in .grad, as at the end of a training step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(BATCH, labels=BATCH).loss.backward()
    opt.step()
    model.zero_grad()
    model(BATCH, labels=BATCH).loss.backward()
    return opt


def _multiplier(model, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """S with W' = S W, where W != 0 (else 1); a Gemma norm computes with (1 + w), so
    there the multiplied quantity is 1 + w."""
    from wisca_cli.spec import spec_for

    offset = spec_for(model.config.model_type).norm.weight_offset
    if offset and name.rsplit(".", 2)[-2].endswith("norm"):
        old, new = old + offset, new + offset
    return torch.where(old != 0, new / old, torch.ones_like(old))


def _exact_targets(model) -> tuple[str, ...]:
    """Every target the family has that is exact (the norm target's final norm -> lm_head too)."""
    from wisca_cli.spec import spec_for

    spec = spec_for(model.config.model_type)
    return tuple(t for t in ("qk", "vo", "ffn", "norm", "conv") if t in spec.targets and t not in spec.inexact_targets)


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, grads, state


def _logits(model):
    return eval_logits(model, BATCH)


def _grads(model):
    model.zero_grad()
    torch.manual_seed(5)            # the same dropout masks (GPT-2's, Phi's) each time
    model(BATCH, labels=BATCH).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", LIVE_FAMILIES)
def test_transition_is_exact_for_weights_moments_and_gradients(family, arch_ckpt):
    """Every family's transformers model, live: the same logits bit for bit; every weight
    times a power of two S, its .grad, exp_avg and exp_avg_sq divided by S, S**2; a new
    gradient is the old one / S; a second transition moves nothing."""
    model = _llama() if family == "llama" else _family(arch_ckpt, family)
    if family == "mixtral":
        assert any(n.endswith("mlp.experts.gate_up_proj") for n, _ in model.named_parameters())
    opt = _trained(model)
    before_logits = _logits(model)
    params, grads, state = _snapshot(model, opt)
    fresh_grads = _grads(model)
    model.zero_grad()
    model(BATCH, labels=BATCH).loss.backward()      # the .grad the transition will find
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # no gradient reaches a few parameters (DeepSeek-V4's indexer: its top-k picks are not differentiable)
    assert len(grads) == sum(1 for _ in model.parameters()) or family == "deepseek_v4"

    report = wisca.transition(model, opt, targets=_exact_targets(model))
    assert report["verification"]["passed"] and report["verification"]["identical"]
    assert torch.equal(_logits(model), before_logits)
    changed = 0
    for name, p in model.named_parameters():
        s = _multiplier(model, name, params[name], p.detach())              # W' = S W, S a power of two
        mant, _ = torch.frexp(s)
        assert bool((mant == 0.5).all()), name
        changed += int((s != 1).sum())
        if name not in grads:   # never trained: no .grad, no moments
            assert p.grad is None and not opt.state[p], name
            continue
        assert torch.equal(p.grad, grads[name] / s), name                      # the old gradient / S
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            assert torch.equal(opt.state[p][key], state[name][key] / s ** power), (name, key)
    assert changed > 0
    after_grads = _grads(model)                                                # a new gradient: g / S
    for name, p in model.named_parameters():
        s = _multiplier(model, name, params[name], p.detach())
        assert (name in after_grads) == (name in fresh_grads), name
        assert name not in fresh_grads or torch.equal(after_grads[name], fresh_grads[name] / s), name
    for kind, s in report["summary"].items():
        assert s["imbalance_after"] < s["imbalance_before"] or s["units_changed"] == 0, kind
    assert sum(s["units_changed"] for s in report["summary"].values()) > 0
    again_params, _, again_state = _snapshot(model, opt)
    second = wisca.transition(model, opt, targets=_exact_targets(model))      # balanced: nothing moves
    assert all(s["units_changed"] == 0 for s in second["summary"].values())
    assert all(torch.equal(p, again_params[n]) for n, p in model.named_parameters())


def test_transition_matches_the_checkpoint_transform(tmp_path):
    """The live transition and `wisca transform` of the same weights give the same tensors."""
    from safetensors.torch import load_file

    model = _llama()
    model.save_pretrained(tmp_path / "src")
    wisca.transform(tmp_path / "src", tmp_path / "dst", targets=("qk", "vo", "ffn", "norm"))
    report = wisca.transition(model, targets=("qk", "vo", "ffn", "norm"), record_dir=tmp_path / "rec")
    on_disk = load_file(tmp_path / "dst" / "model.safetensors")
    for name, p in model.named_parameters():
        if name in on_disk:
            assert torch.equal(p.detach(), on_disk[name]), name
    assert report["summary"].keys() == {"qk", "vo", "ffn", "norm"}
    assert report["layers"][-1]["layer"] == "final"   # final norm -> lm_head (untied), as on disk
    # the record lets a checkpoint saved after the transition be undone
    model.save_pretrained(tmp_path / "rec")
    wisca.undo(tmp_path / "rec", tmp_path / "restored")
    restored = load_file(tmp_path / "restored" / "model.safetensors")
    original = load_file(tmp_path / "src" / "model.safetensors")
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("scales", ["pow2", "continuous"])
def test_failed_verification_restores_everything(scales, monkeypatch):
    model = _llama()
    opt = _trained(model)
    params, grads, state = _snapshot(model, opt)
    real = live.member_multipliers

    def broken(pair, s, shapes):   # forget to divide o_proj's columns: the function changes
        out = real(pair, s, shapes)
        if pair.kind == "vo":
            out["o"] = torch.ones_like(out["o"])
        return out

    monkeypatch.setattr(live, "member_multipliers", broken)
    with pytest.raises(wisca.VerificationFailed) as e:
        wisca.transition(model, opt, scales=scales)
    assert e.value.report["verification"]["passed"] is False
    after_params, after_grads, after_state = _snapshot(model, opt)
    assert all(torch.equal(after_params[n], params[n]) for n in params)
    assert all(torch.equal(after_grads[n], grads[n]) for n in grads)
    assert all(torch.equal(after_state[n][k], state[n][k]) for n in state for k in state[n])


def test_optimizers_it_cannot_transform_are_refused_before_anything_changes():
    model = _llama()
    opt = _trained(model)
    for state in opt.state.values():
        state["exp_avg_sq_row"] = torch.zeros(1)      # an Adafactor-like factored moment
    params, _, _ = _snapshot(model, opt)
    with pytest.raises(wisca.WiscaError, match="optimizer_state='reset'"):
        wisca.transition(model, opt)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    report = wisca.transition(model, opt, optimizer_state="reset")
    assert report["optimizer"]["reset"] and len(opt.state) == 0


def test_wrapped_optimizer_and_report_is_json(arch_ckpt):
    import json

    class Wrapper:   # accelerate's AcceleratedOptimizer keeps the torch optimizer here
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = _llama()
    opt = _trained(model)
    _, _, state = _snapshot(model, opt)
    report = wisca.transition(model, Wrapper(opt), verify=False)
    json.dumps(report)
    assert report["verification"] is None and report["optimizer"]["optimizer"] == "AdamW"
    names = {id(p): n for n, p in model.named_parameters()}
    moved = [n for p, s in opt.state.items() for n in [names[id(p)]] if not torch.equal(s["exp_avg"], state[n]["exp_avg"])]
    assert moved


def test_fsdp2_transition_under_torchrun(tmp_path, arch_ckpt):
    """Two ranks, gloo, FSDP2 fully_shard: the sharded transition equals the single-process one,
    for a dense Llama (1-D mesh and HSDP) and DeepSeek-V3 (MLA, fused experts sharded over experts)."""
    for mesh, model in (("1d", None), ("2d", None), ("1d", arch_ckpt("deepseek_v3"))):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--standalone", str(REPO / "tests" / "fsdp_worker.py"), mesh, str(tmp_path),
                              *([str(model)] if model else [])],
                             capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("FSDP2 OK") == 2, res.stdout


def test_transition_lora_on_a_peft_model():
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(3):
        model(BATCH, labels=BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    mods = live._lora_modules(model)
    for _, _, a, b in mods:   # skew every module's rank channels: same B A, unbalanced A / B
        params = dict(model.named_parameters())
        s = torch.exp2(torch.randint(-3, 4, (params[a].shape[0],)).double())
        with torch.no_grad():
            params[a].mul_(s[:, None].float())
            params[b].div_(s[None, :].float())
    before = _logits(model)
    params = dict(model.named_parameters())
    products = {a: params[b].detach() @ params[a].detach() for _, _, a, b in mods}
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: s["exp_avg_sq"].clone() for p, s in opt.state.items()}
    old = {n: p.detach().clone() for n, p in params.items()}
    report = wisca.transition(model, opt)          # a PEFT model: per LoRA module and rank channel
    assert report["kind"] == "lora-adapter" and len(report["modules"]) == len(mods) == 2 * 3
    assert report["verification"]["identical"] and torch.equal(_logits(model), before)
    s = report["summary"]["lora"]
    assert s["units_changed"] > 0 and s["imbalance_after"] < s["imbalance_before"]
    for _, _, a, b in mods:
        assert torch.equal(params[b].detach() @ params[a].detach(), products[a])
        for n in (a, b):
            ratio = torch.where(old[n] != 0, params[n].detach() / old[n], torch.ones_like(old[n]))
            assert torch.equal(opt.state[params[n]]["exp_avg_sq"], moments[n] / ratio ** 2), n


def test_trainer_callback_transitions_at_step_3(tmp_path):
    """Trainer with WiscaCallback(at_steps=(3,)): the report in the log history; after step 3
    the model computes what a run without the callback computes at step 3, with other weights."""
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]

    def run(callbacks, out):
        model = _llama()
        args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                                 use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000, seed=0,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        return trainer

    plain = run([], tmp_path / "a")
    cb = wisca.WiscaCallback(at_steps=(3,))
    with_cb = run([cb], tmp_path / "b")
    entries = [e for e in with_cb.state.log_history if "wisca" in e]
    assert len(entries) == 1 and entries[0]["step"] == 3 and entries[0]["wisca"]["identical"]
    assert len(cb.reports) == 1
    assert torch.equal(_logits(plain.model), _logits(with_cb.model))
    differ = [n for (n, p), (_, q) in zip(plain.model.named_parameters(), with_cb.model.named_parameters())
              if not torch.equal(p, q)]
    assert differ
    assert wisca.WiscaCallback(every=2).due(4) and not wisca.WiscaCallback(every=2).due(3)


def test_nan_in_a_later_layer_changes_nothing():
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    params, _, _ = _snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(wisca.WiscaError, match="NaN or Inf"):
        wisca.transition(model)
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert all(torch.equal(after[n], params[n], ) or n.endswith("down_proj.weight") and
               torch.equal(torch.nan_to_num(after[n]), torch.nan_to_num(params[n])) for n in params)


@pytest.mark.parametrize("family", LIVE_FAMILIES[1:])
def test_memory_renames_are_transformers_own(family, arch_ckpt):
    """A spec's memory_renames is transformers 5's renaming: every saved tensor the model
    keeps under another name is found under ``spec.memory_name``, and every in-memory name
    not saved is such a rename (or a tied head, or a fused expert tensor)."""
    from safetensors import safe_open

    from wisca_cli.spec import spec_for

    path = arch_ckpt(family)
    with safe_open(path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    model = _family(arch_ckpt, family)
    memory, spec = set(model.state_dict()), spec_for(model.config.model_type)
    renamed = {spec.memory_name(n) for n in saved if ".experts." not in n}
    assert renamed <= memory, sorted(renamed - memory)
    left = memory - renamed - {n for n in memory if ".experts." in n}
    assert left <= ({"lm_head.weight"} if model.config.tie_word_embeddings else set()), sorted(left)
