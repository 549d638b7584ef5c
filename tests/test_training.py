"""Between training stages: an HF Trainer checkpoint's optimizer state follows the transform.

A tiny GQA llama (skewed weight pattern) is trained a few steps with transformers' Trainer,
which writes checkpoint-N/ with model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth
and trainer_state.json. The transform's scales W' = S * W must reach the Adam moments as
exp_avg / S and exp_avg_sq / S**2, bit for bit with power-of-two scales, and training must
resume from the transformed folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import wisca_cli as wisca
from conftest import make_config, unbalance
from wisca_cli.errors import WiscaError
from wisca_cli.training import optimizer_parameter_names, tensor_shapes, transform_training_state

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
pytest.importorskip("accelerate")   # transformers' Trainer needs it

STEPS, SAVE = 4, 2


def _dataset(n: int = 16, length: int = 16, seed: int = 0) -> list[dict]:
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "labels": x} for x in ids]


def _args(out: Path, max_steps: int, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=SAVE, per_device_train_batch_size=4,
                             learning_rate=1e-3, weight_decay=0.1, warmup_steps=1, use_cpu=True, report_to=[],
                             dataloader_num_workers=0, logging_steps=1000, seed=0, **kw)


def _tiny_llama(seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                             attn_implementation="eager")
    unbalance(model, seed)   # a skewed weight pattern, so the transform has scales to apply
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, checkpoint-2 folder, {position: parameter name} as the live Trainer had it)."""
    from transformers import Trainer

    run = tmp_path_factory.mktemp("trainer") / "run"
    model = _tiny_llama()
    trainer = Trainer(model=model, args=_args(run, STEPS), train_dataset=_dataset())
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    live = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    ckpt = run / f"checkpoint-{SAVE}"
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert (ckpt / f).is_file(), f
    return run, ckpt, dict(enumerate(live))


@pytest.fixture(scope="module")
def transformed(trained, tmp_path_factory):
    """The checkpoint transformed as api.transform will do it once wired: model, then optimizer."""
    _, ckpt, _ = trained
    out = tmp_path_factory.mktemp("wisca") / "ckpt-wisca"
    report = wisca.transform(ckpt, out)
    mult = wisca.scale_multipliers(out)
    # reads src, writes dst: the same result whether or not api.transform already did it
    record = transform_training_state(ckpt, out, mult, list(tensor_shapes(ckpt)))
    if "training_state" in report:        # wired into api.transform: it made the same record
        assert report["training_state"] == record
    return out, mult, record


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_trainer_positions_map_to_the_names_trainer_used(trained):
    """Evidence for the mapping: the live Trainer's param groups, by object identity."""
    _, ckpt, live = trained
    assert optimizer_parameter_names(ckpt) == live
    groups = [g["params"] for g in _load(ckpt / "optimizer.pt")["param_groups"]]
    decay = [live[i] for i in groups[0]]
    assert all("norm" not in n and "bias" not in n for n in decay)              # group 0: weight decay
    assert all("norm" in n for n in (live[i] for i in groups[1]))                # group 1: norms, no decay


@pytest.mark.parametrize("model_type, extra", [
    ("qwen2", {}),                                   # q/k/v biases: no weight decay
    ("llama", {"tie_word_embeddings": True}),        # lm_head is the embedding: one parameter
    ("qwen3", {}),                                   # q_norm / k_norm inside the attention
])
def test_positions_map_for_other_layouts(model_type, extra, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(model_type, num_attention_heads=4, num_key_value_heads=2,
                                                         **extra), attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    live = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    ckpt = tmp_path / "run" / f"checkpoint-{SAVE}"
    assert optimizer_parameter_names(ckpt) == dict(enumerate(live))
    out = tmp_path / "out"
    wisca.transform(ckpt, out)
    record = transform_training_state(ckpt, out, wisca.scale_multipliers(out), list(tensor_shapes(ckpt)))
    assert record["optimizer"]["transformed"] and record["optimizer"]["parameters"] == len(live)


def test_adam_moments_follow_the_scales_bit_exactly(trained, transformed):
    _, ckpt, _ = trained
    out, mult, record = transformed
    opt = record["optimizer"]
    assert opt["transformed"] and opt["format"] == "hf-trainer" and opt["optimizer"] == "AdamW"
    assert opt["exact"] and opt["underflow"] == 0
    names = optimizer_parameter_names(ckpt)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    assert before["param_groups"] == after["param_groups"]
    scaled = 0
    for key, entry in before["state"].items():
        s = mult.get(names[key])
        new = after["state"][key]
        assert torch.equal(new["step"], entry["step"])
        if s is None:
            assert all(torch.equal(new[k], entry[k]) for k in entry)
            continue
        scaled += 1
        s = s.float()
        assert torch.equal(new["exp_avg"], entry["exp_avg"] / s)
        assert torch.equal(new["exp_avg_sq"], entry["exp_avg_sq"] / (s * s))
    assert scaled == opt["scaled_parameters"] == 12        # q, k, v, o, up, down in 2 layers
    assert opt["tensors"] == 2 * scaled
    # every other training file is the source's, byte for byte
    for f in ("scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        assert (out / f).read_bytes() == (ckpt / f).read_bytes()


def test_gradients_are_divided_by_the_scales(trained, transformed):
    from transformers import AutoModelForCausalLM

    _, ckpt, _ = trained
    out, mult, _ = transformed
    batch = torch.stack([d["input_ids"] for d in _dataset(4, seed=7)])
    grads = []
    for folder in (ckpt, out):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        model(batch, labels=batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(mult) == 12
    # power-of-two scales: every product in the backward pass scales exactly, so the
    # gradients are bit-identical to g / S (and to g where S = 1)
    for name, g in grads[0].items():
        want = g / mult[name].float() if name in mult else g
        assert torch.equal(grads[1][name], want), name


def test_training_resumes_from_the_transformed_checkpoint(transformed, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    out, _, _ = transformed
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "resumed", STEPS + 2), train_dataset=_dataset())
    result = trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == STEPS + 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    # the optimizer Trainer resumed with holds the transformed moments (then took 4 more steps)
    assert len(trainer.optimizer.state) == len(_load(out / "optimizer.pt")["state"])


def test_undo_restores_the_optimizer_state_bit_identically(trained, transformed, tmp_path):
    _, ckpt, _ = trained
    out, mult, _ = transformed
    restored = tmp_path / "restored"
    wisca.undo(out, restored)
    record = transform_training_state(out, restored, mult, list(tensor_shapes(out)), invert=True)
    assert record["optimizer"]["transformed"] and record["optimizer"]["direction"] == "S (undo)"
    a, b = _load(ckpt / "optimizer.pt"), _load(restored / "optimizer.pt")
    assert a["param_groups"] == b["param_groups"]
    for key, entry in a["state"].items():
        assert all(torch.equal(entry[k], b["state"][key][k]) for k in entry), key
    assert (restored / "optimizer.pt").read_bytes() == (ckpt / "optimizer.pt").read_bytes()


def _copy_checkpoint(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    (dst / "optimizer.pt").unlink()
    return dst


@pytest.mark.parametrize("kind", ["sgd", "adamw-amsgrad"])
def test_by_name_state_dict(trained, kind, tmp_path):
    """A state keyed by parameter name (torch.distributed.checkpoint's get_optimizer_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    _, ckpt, _ = trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if kind == "sgd" else \
        torch.optim.AdamW(params, lr=1e-3, amsgrad=True)
    batch = torch.stack([d["input_ids"] for d in _dataset(4)])
    for _ in range(2):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(src)
    state = get_optimizer_state_dict(model, opt)
    assert all(isinstance(k, str) for k in state["state"])
    torch.save(state, src / "optim.pt")

    out = tmp_path / "out"
    wisca.transform(src, out)
    mult = wisca.scale_multipliers(out)
    record = transform_training_state(src, out, mult, list(tensor_shapes(src)))["optimizer"]
    assert record["transformed"] and record["format"] == "by-name" and record["file"] == "optim.pt"
    assert record["optimizer"] == ("SGD" if kind == "sgd" else "AdamW")
    after = _load(out / "optim.pt")
    powers = {"momentum_buffer": 1} if kind == "sgd" else {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
    assert record["scaled_parameters"] == 12
    for name, entry in state["state"].items():
        s = mult.get(name, torch.ones(1, dtype=torch.float64)).float()
        for k, p in powers.items():
            assert torch.equal(after["state"][name][k], entry[k] / s ** p), (name, k)


def test_unknown_optimizer_is_refused_before_anything_is_written(trained, tmp_path):
    _, ckpt, _ = trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    torch.save({"state": {0: {"step": torch.tensor(2.0), "exp_avg_sq_row": torch.ones(128), "foo": torch.ones(3)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}]}, src / "optimizer.pt")
    out = tmp_path / "out"
    with pytest.raises(WiscaError, match=r"optimizer\.pt: optimizer state keys \['exp_avg_sq_row', 'foo', 'step'\]"
                                         r".*nothing written"):
        wisca.transform(src, out)
    assert not out.exists()
    with pytest.raises(WiscaError, match="foo"):
        transform_training_state(src, out, {}, list(tensor_shapes(src)))
    # a file that is not a tensor-only state dict: the same
    torch.save({"state": {}, "param_groups": [{"params": []}], "hook": _Opaque()}, src / "optimizer.pt")
    with pytest.raises(WiscaError, match=r"optimizer\.pt: cannot be read with torch\.load\(weights_only=True\)"):
        wisca.transform(src, out)
    assert not out.exists()
    (src / "optimizer.pt").unlink()
    assert transform_training_state(src, out, {}, []) == {}


class _Opaque:   # pickled by reference: torch.load(weights_only=True) refuses it
    pass


def test_inconsistent_positions_are_refused(trained, tmp_path):
    _, ckpt, _ = trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    sd = _load(ckpt / "optimizer.pt")
    mult = {n: torch.full((1, 1), 2.0, dtype=torch.float64) for n in tensor_shapes(src)}
    # one parameter fewer than the model has: no grouping rule fits
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:-1]
    sd["state"].pop(20)
    torch.save(sd, src / "optimizer.pt")
    with pytest.raises(WiscaError, match=r"optimizer\.pt: cannot map the optimizer's parameter positions"):
        transform_training_state(src, tmp_path, mult, list(tensor_shapes(src)))
    # the right count, but a moment whose shape is not its parameter's
    sd = _load(ckpt / "optimizer.pt")
    sd["state"][2]["exp_avg"] = torch.zeros(3, 3)
    torch.save(sd, src / "optimizer.pt")
    with pytest.raises(WiscaError, match=r"optimizer\.pt: .*state 2 exp_avg has shape \(3, 3\)"):
        transform_training_state(src, tmp_path, mult, list(tensor_shapes(src)))


# -- through the command line ---------------------------------------------------------------
def test_cli_transform_and_undo_carry_the_optimizer_state(trained, tmp_path):
    import json

    from conftest import run_cli

    _, ckpt, _ = trained
    out, back = tmp_path / "out", tmp_path / "back"
    res = run_cli("transform", ckpt, out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["scaled_parameters"] == 12
    assert json.loads((out / "wisca.json").read_text())["training_state"] == report["training_state"]
    res = run_cli("undo", out, back, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["training_state"]["optimizer"]["direction"] == "S (undo)"
    assert (back / "optimizer.pt").read_bytes() == (ckpt / "optimizer.pt").read_bytes()


def test_cli_refuses_an_optimizer_state_it_cannot_transform_and_drop_opts_out(trained, tmp_path):
    import json

    from conftest import run_cli

    _, ckpt, _ = trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    torch.save({"state": {0: {"exp_avg_sq_row": torch.ones(128)}}, "param_groups": [{"params": [0]}]},
               src / "optimizer.pt")
    res = run_cli("transform", src, tmp_path / "out", "--json")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert f"{src / 'optimizer.pt'}: optimizer state keys ['exp_avg_sq_row']" in lines[0]
    assert "pass --training-state drop" in lines[0] and not (tmp_path / "out").exists()
    # the opt-out: the weights, transformed and verified, and no optimizer state at all
    res = run_cli("transform", src, tmp_path / "out", "--json", "--training-state", "drop")
    assert res.returncode == 0, res.stderr
    opt = json.loads(res.stdout)["training_state"]["optimizer"]
    assert opt["dropped"] == ["optimizer.pt"] and opt["transformed"] is False and "fresh optimizer" in opt["resume"]
    assert not (tmp_path / "out" / "optimizer.pt").exists() and (tmp_path / "out" / "scheduler.pt").is_file()
    assert "left out of the output" in res.stderr
    assert run_cli("verify", src, tmp_path / "out").returncode == 0
    # and a known optimizer whose positions do not fit the model: exit 2, one line, nothing written
    sd = _load(ckpt / "optimizer.pt")
    sd["state"][2]["exp_avg"] = torch.zeros(3, 3)
    torch.save(sd, src / "optimizer.pt")
    res = run_cli("transform", src, tmp_path / "out2")
    assert res.returncode == 2 and "optimizer.pt" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_norm_target_carries_the_final_norm_and_lm_head_moments(trained, tmp_path):
    """The final norm -> lm_head pair (untied embeddings): both tensors' Adam moments follow."""
    _, ckpt, _ = trained
    out = tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("norm",))
    assert report["layers"][-1]["layer"] == "final" and report["training_state"]["optimizer"]["exact"]
    mult = wisca.scale_multipliers(out)
    names = optimizer_parameter_names(ckpt)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    key_of = {names[k]: k for k in before["state"]}
    for name in ("lm_head.weight", "model.norm.weight"):
        s, k = mult[name].float(), key_of[name]
        assert (s != 1).any(), name
        assert torch.equal(after["state"][k]["exp_avg"], before["state"][k]["exp_avg"] / s), name
        assert torch.equal(after["state"][k]["exp_avg_sq"], before["state"][k]["exp_avg_sq"] / (s * s)), name
    wisca.undo(out, tmp_path / "back")
    restored = _load(tmp_path / "back" / "optimizer.pt")
    for name in ("lm_head.weight", "model.norm.weight"):
        k = key_of[name]
        assert all(torch.equal(restored["state"][k][m], before["state"][k][m]) for m in ("exp_avg", "exp_avg_sq"))


# -- MoE: experts fused in memory (transformers 5), saved per expert ---------------------------
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5_moe"]
# transformers 4.x's per-expert modules, their parameters in definition order (Mixtral:
# MixtralBlockSparseTop2MLP defines w1, w2, w3; the others a LlamaMLP-like gate, up, down)
PER_EXPERT_ORDER = {"mixtral": ("w1", "w2", "w3")}


def test_every_moe_family_is_tested_as_the_support_matrix_claims():
    """The README's "Trainer checkpoint" column says "fused experts" for every MoE spec."""
    from wisca_cli import spec

    rows = {r["family"]: r["trainer"] for r in spec.support_matrix()}
    moe = {s.name for s in spec.shipped_specs().values() if s.moe is not None}
    assert moe == set(MOE_FAMILIES) | set(FUSED_IN_MEMORY_AS_ON_DISK) | {"nemotron_h", "gemma4", "deepseek_v4"}   # own tests
    assert all(rows[f] == "exact, fused experts" for f in moe)


# families whose experts transformers keeps in memory as they are on disk (no conversion
# mapping): a fused parameter is one checkpoint tensor, its moments scale as the tensor does
FUSED_IN_MEMORY_AS_ON_DISK = ["gpt_oss", "llama4", "mistral4", "granitemoehybrid"]   # Granite: renamed only


@pytest.mark.parametrize("family", FUSED_IN_MEMORY_AS_ON_DISK)
def test_fused_on_disk_trainer_moments_follow_bit_for_bit(family, tmp_path):
    """gpt-oss, Llama 4, Mistral 4, Granite 4: the fused experts (gate_up_proj [E, H, 2I], gpt-oss's bias,
    down_proj; Mistral 4's as DeepSeek-V3's, [E, 2I, H]; Granite's input_linear / output_linear, [E, 2I, H],
    renamed in memory) are parameters and checkpoint tensors alike; with the
    norm target their inputs are scaled per expert slice, and Adam's moments follow: exp_avg / S,
    exp_avg_sq / S**2, bit for bit."""
    from conftest import build, hf_logits, probe_tokens
    from transformers import AutoModelForCausalLM, Trainer

    start = build(tmp_path / "start", family, skew="spec")
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("qk", "vo", "norm"))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0
    assert torch.equal(hf_logits(ckpt, probe_tokens()), hf_logits(out, probe_tokens()))
    from wisca_cli.spec import spec_for

    spec = spec_for(model.config.model_type)   # multipliers and parameter positions by saved name
    mult, names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    gate_up = [n for n in mult if spec.memory_name(n).endswith("experts.gate_up_proj")]
    inputs = (4, 1, 64) if family in ("mistral4", "granitemoehybrid") else (4, 64, 1)   # per expert, the hidden axis
    assert gate_up and all(tuple(mult[n].shape) == inputs and (mult[n] != 1).any() for n in gate_up)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    for key, b in before["state"].items():
        s = mult.get(names[key], torch.ones(1, dtype=torch.float64)).float()
        a = after["state"][key]
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))


# dense hybrid families (their MoE ones are in MOE_FAMILIES): Gated DeltaNet or Mamba2 layers beside
# attention; OLMo-hybrid's norms are renamed in memory and its conv is one parameter saved as three tensors
HYBRID_DENSE = ["qwen3_5", "olmo_hybrid", "granitemoehybrid-dense"]


@pytest.mark.parametrize("family", HYBRID_DENSE)
def test_hybrid_trainer_moments_follow_bit_for_bit(family, tmp_path):
    """A Trainer checkpoint of a hybrid family, every target: logits bit-identical in transformers,
    Adam's moments exp_avg / S and exp_avg_sq / S**2 bit for bit for every parameter (the conv's by its
    channels' scales: OLMo-hybrid's one parameter by its three saved parts'; untouched ones unchanged),
    training continues from the output."""
    from conftest import build, hf_logits, probe_tokens
    from transformers import AutoModelForCausalLM, Trainer

    from wisca_cli.spec import spec_for

    start = build(tmp_path / "start", family, skew="spec")
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("qk", "vo", "ffn", "norm", "conv"))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0   # moments: powers of two divide exactly
    inexact = set(spec_for(model.config.model_type).inexact_targets)   # Qwen3.5's (1 + w) norms round
    before_logits, after_logits = hf_logits(ckpt, probe_tokens()), hf_logits(out, probe_tokens())
    assert report["verification"]["mode"] == ("tolerance" if inexact else "exact")
    assert torch.equal(before_logits, after_logits) if not inexact else \
        torch.allclose(before_logits, after_logits, atol=1e-4)
    mult, names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    assert sum(bool((m != 1).any()) for m in mult.values()) >= 4
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    assert len(before["state"]) == len(names) == len(list(model.parameters()))
    conv = [k for k, n in names.items() if n.endswith(("linear_attn.conv1d.weight", "mamba.conv1d.weight"))]
    assert conv
    shapes = tensor_shapes(ckpt)

    def multiplier(name):
        """A parameter's multiplier; OLMo-hybrid's conv is saved as three parts, stacked along its channels."""
        if name in shapes or not name.endswith("linear_attn.conv1d.weight"):
            return mult.get(name, torch.ones(1, dtype=torch.float64))
        parts = [name.replace("conv1d", f"{p}_conv1d") for p in "qkv"]
        return torch.cat([torch.broadcast_to(mult.get(p, torch.ones(1, 1, 1, dtype=torch.float64)), shapes[p])
                          for p in parts])

    for key, b in before["state"].items():
        s = multiplier(names[key]).float()
        a = after["state"][key]
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))
    assert "conv" in report["targets_applied"]   # the conv target: its channels / s, their moments / s and / s**2
    assert any(not torch.equal(after["state"][k]["exp_avg"], before["state"][k]["exp_avg"]) for k in conv)
    resumed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    more = Trainer(model=resumed, args=_args(tmp_path / "more", SAVE + 2), train_dataset=_dataset(8))
    more.train(resume_from_checkpoint=str(out))
    assert more.state.global_step == SAVE + 2


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe"])
def test_gemma4_trainer_moments_follow_bit_for_bit(family, tmp_path):
    """Gemma 4 (its small models: per-layer head dims, kv shared across layers, a double-wide MLP,
    per-layer input embeddings; its MoE model: experts fused as saved, [E, 2I, H], beside the dense
    MLP, keys as values): a Trainer checkpoint, every target. Logits bit-identical in transformers;
    Adam's moments exp_avg / S and exp_avg_sq / S**2 bit for bit for every parameter (the experts'
    per expert slice, the per-layer embedding untouched); training resumes from the output."""
    from conftest import build, hf_logits, probe_tokens
    from transformers import AutoModelForCausalLM, Trainer

    start = build(tmp_path / "start", family, skew="spec")
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("qk", "vo", "ffn", "norm"))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0
    assert report["verification"]["mode"] == "exact" and report["targets_not_applicable"] == ["vo"]
    assert torch.equal(hf_logits(ckpt, probe_tokens()), hf_logits(out, probe_tokens()))
    mult, names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    assert sum(bool((m != 1).any()) for m in mult.values()) >= 4
    gate_up = [n for n in mult if n.endswith("experts.gate_up_proj")]
    assert bool(gate_up) == (family == "gemma4-moe")
    assert all(mult[n].shape[0] == 4 and (mult[n] != 1).any() for n in gate_up)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    assert len(before["state"]) == len(names) == len(list(model.parameters()))
    for key, b in before["state"].items():
        s = mult.get(names[key], torch.ones(1, dtype=torch.float64)).float()
        a = after["state"][key]
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))
    ple = [k for k, n in names.items() if "per_layer" in n]
    assert bool(ple) == (family == "gemma4")
    assert all(torch.equal(after["state"][k]["exp_avg"], before["state"][k]["exp_avg"]) for k in ple)
    resumed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    more = Trainer(model=resumed, args=_args(tmp_path / "more", SAVE + 2), train_dataset=_dataset(8))
    more.train(resume_from_checkpoint=str(out))
    assert more.state.global_step == SAVE + 2


def test_deepseek_v4_trainer_moments_follow_bit_for_bit(tmp_path, monkeypatch):
    """DeepSeek-V4 (hyper-connections, compressed and sparse attention with its indexer, hash and
    sqrt(softplus) routing; experts saved one by one as w1 / w3 / w2 under ffn., fused in memory as
    mlp.experts.gate_up_proj [E, 2I, H] and down_proj): a Trainer checkpoint with its one target,
    norm. Logits bit-identical in transformers; Adam's moments follow the weights bit for bit, a fused
    expert parameter's per expert slice by that expert's saved tensors' multipliers (the indexer, which
    no gradient reaches, has none); the token table is copied; training resumes from the output."""
    from conftest import build, hf_logits, probe_tokens
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Trainer

    start = build(tmp_path / "start", "deepseek_v4", skew="spec")
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    live = dict(enumerate(names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]))
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("norm",))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0
    assert report["verification"]["mode"] == "exact" and report["targets_applied"] == ["norm"]
    assert torch.equal(hf_logits(ckpt, probe_tokens()), hf_logits(out, probe_tokens()))
    mult, saved_names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    fused = moved = 0
    for key, n in live.items():
        if key not in before["state"]:   # no gradient reached it: no moments
            assert key not in after["state"] and ".indexer." in n, n
            continue
        b, a = before["state"][key], after["state"][key]
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            for saved, box, _ in _experts_of("deepseek_v4", n, b["exp_avg"].shape):
                s = mult.get(saved, torch.ones(1, dtype=torch.float64)).float()
                assert torch.equal(a["exp_avg"][box], b["exp_avg"][box] / s), saved
                assert torch.equal(a["exp_avg_sq"][box], b["exp_avg_sq"][box] / (s * s)), saved
            fused += not torch.equal(a["exp_avg"], b["exp_avg"])
            continue
        s = mult.get(saved_names[key], torch.ones(1, dtype=torch.float64)).float()
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))
        moved += not torch.equal(a["exp_avg"], b["exp_avg"])
    assert fused == 4 and moved >= 8    # every layer's gate_up_proj (input columns); q_a, kv, q_b, router, ...
    tables = [k for k in load_file(ckpt / "model.safetensors") if k.endswith("tid2eid")]
    assert tables and all(torch.equal(load_file(ckpt / "model.safetensors")[k], load_file(out / "model.safetensors")[k])
                          for k in tables)
    # transformers 5.25's Trainer reads a checkpoint's config.json through the base config class on resume,
    # whose layer-type check rejects DeepSeek-V4's mlp_layer_types (an untouched checkpoint fails alike):
    # read it through the family's own class, as from_pretrained does
    from transformers import AutoConfig, PreTrainedConfig

    monkeypatch.setattr(PreTrainedConfig, "from_json_file",
                        classmethod(lambda cls, f: AutoConfig.from_pretrained(Path(f).parent)))
    resumed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    more = Trainer(model=resumed, args=_args(tmp_path / "more", SAVE + 2), train_dataset=_dataset(8))
    more.train(resume_from_checkpoint=str(out))
    assert more.state.global_step == SAVE + 2


def test_nemotron_h_trainer_moments_follow_bit_for_bit(tmp_path):
    """Nemotron-H (Mamba2, attention, relu² MLP and MoE blocks; saved as backbone.*, model.* in memory;
    relu² experts saved one by one, fused in memory as mixer.experts.up_proj [E, I, H] and down_proj):
    a Trainer checkpoint, every target. Logits bit-identical in transformers; Adam's moments follow the
    weights bit for bit, a fused expert parameter's by its experts' stacked multipliers (ffn's down / s²
    included); training resumes from the output."""
    from conftest import build, hf_logits, probe_tokens
    from transformers import AutoModelForCausalLM, Trainer

    start = build(tmp_path / "start", "nemotron_h", skew="spec")
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    assert any(n.endswith("mixer.experts.up_proj") for n, _ in model.named_parameters())   # fused in memory
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("qk", "vo", "ffn", "norm", "conv"))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0
    assert torch.equal(hf_logits(ckpt, probe_tokens()), hf_logits(out, probe_tokens()))
    mult, names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    assert len(before["state"]) == len(names) == len(list(model.parameters()))
    fused = 0
    for key, b in before["state"].items():
        n, shape = names[key], b["exp_avg"].shape
        if n.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
            pre, kind = ("backbone." + n.removeprefix("model.")).rsplit(".experts.", 1)
            one = torch.ones(1, dtype=torch.float64)
            s = torch.stack([torch.broadcast_to(mult.get(f"{pre}.experts.{e}.{kind}.weight", one), shape[1:])
                             for e in range(shape[0])]).float()
            fused += bool((s != 1).any())
        else:
            s = mult.get(n, torch.ones(1, dtype=torch.float64)).float()
        a = after["state"][key]
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s)), n
    assert fused == 2                                   # the MoE block's up_proj and down_proj
    resumed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    more = Trainer(model=resumed, args=_args(tmp_path / "more", SAVE + 2), train_dataset=_dataset(8))
    more.train(resume_from_checkpoint=str(out))
    assert more.state.global_step == SAVE + 2


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe_trained(request, tmp_path_factory):
    """(family, checkpoint-2 of a Trainer run on a skewed tiny MoE, {position: in-memory name})."""
    from conftest import build
    from transformers import AutoModelForCausalLM, Trainer

    family = request.param
    root = tmp_path_factory.mktemp(f"moe-{family}")
    start = build(root / "start", family, skew="spec")      # function-identical, unbalanced
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")
    assert any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())   # fused in memory
    trainer = Trainer(model=model, args=_args(root / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    live = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    return family, root / "run" / f"checkpoint-{SAVE}", dict(enumerate(live))


@pytest.fixture(scope="module")
def moe_transformed(moe_trained, tmp_path_factory):
    import json

    from conftest import run_cli

    family, ckpt, _ = moe_trained
    out = tmp_path_factory.mktemp(f"moe-out-{family}") / "out"
    res = run_cli("transform", ckpt, out, "--json")
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


def _experts_of(family: str, name: str, shape) -> list[tuple[str, tuple, int]]:
    """(checkpoint name, index into the fused in-memory tensor, expert), stated here from the
    layout transformers documents (gate_up_proj [E, 2I, H]: gate rows, then up rows;
    down_proj [E, H, I]; Mixtral's block_sparse_moe is mlp in memory, w1/w3/w2 its
    gate/up/down), independently of wisca's reading of the conversion mapping."""
    pre, kind = name.rsplit(".experts.", 1)
    saved = pre[:-len(".mlp")] + {"mixtral": ".block_sparse_moe", "deepseek_v4": ".ffn"}.get(family, ".mlp")
    gate, up, down = ("w1", "w3", "w2") if family in ("mixtral", "deepseek_v4") else ("gate_proj", "up_proj", "down_proj")
    out = []
    for e in range(shape[0]):
        if kind == "gate_up_proj":
            half = shape[1] // 2
            out += [(f"{saved}.experts.{e}.{gate}.weight", (e, slice(0, half)), e),
                    (f"{saved}.experts.{e}.{up}.weight", (e, slice(half, None)), e)]
        else:
            out.append((f"{saved}.experts.{e}.{down}.weight", (e,), e))
    return out


def test_moe_positions_map_to_the_in_memory_parameters(moe_trained):
    family, ckpt, live = moe_trained
    names = optimizer_parameter_names(ckpt)
    shapes = tensor_shapes(ckpt)
    assert len(names) == len(live)
    for key, n in live.items():
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert names[key] == n                          # fused: named as in memory
        elif family == "mixtral" and ".mlp.gate." in n:
            assert names[key] == n.replace(".mlp.", ".block_sparse_moe.")   # the router, renamed on save
        else:
            assert names[key] == n and n in shapes


def test_moe_transform_is_exact_and_moments_follow_bit_for_bit(moe_trained, moe_transformed):
    from conftest import hf_logits, probe_tokens

    family, ckpt, live = moe_trained
    out, report = moe_transformed
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0 and opt["format"] == "hf-trainer"
    ids = probe_tokens()
    assert torch.equal(hf_logits(ckpt, ids), hf_logits(out, ids))
    assert report["summary"]["ffn"]["imbalance_after"] < report["summary"]["ffn"]["imbalance_before"]
    mult = wisca.scale_multipliers(out)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    fused = 0
    for key, n in live.items():
        b, a = before["state"][key], after["state"][key]
        assert torch.equal(a["step"], b["step"])
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            for saved, box, _ in _experts_of(family, n, b["exp_avg"].shape):
                s = mult.get(saved, torch.ones(1, dtype=torch.float64)).float()
                assert torch.equal(a["exp_avg"][box], b["exp_avg"][box] / s), saved
                assert torch.equal(a["exp_avg_sq"][box], b["exp_avg_sq"][box] / (s * s)), saved
            fused += not torch.equal(a["exp_avg"], b["exp_avg"])
        else:
            s = mult.get(optimizer_parameter_names(ckpt)[key], torch.ones(1, dtype=torch.float64)).float()
            assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))
    layers = sum(n.endswith("experts.gate_up_proj") for n in live.values())   # dense layers have none
    assert layers == (1 if family in ("qwen2_moe", "deepseek_v3", "glm4_moe") else 2)      # mlp_only_layers, first_k_dense_replace
    assert fused == 2 * layers                               # gate_up_proj (up rows) and down_proj per MoE layer


def test_moe_training_resumes_and_undo_restores_bit_identically(moe_trained, moe_transformed, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    from conftest import run_cli, tree_hash

    family, ckpt, _ = moe_trained
    out, _ = moe_transformed
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "resumed", SAVE + 1), train_dataset=_dataset(8))
    result = trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == SAVE + 1 and torch.isfinite(torch.tensor(result.training_loss))
    back = tmp_path / "back"
    res = run_cli("undo", out, back)
    assert res.returncode == 0, res.stderr
    want = tree_hash(ckpt)
    got = tree_hash(back)
    for f in ("model.safetensors", "optimizer.pt"):
        assert got[f] == want[f], f


def test_moe_per_expert_optimizer_state_of_transformers_4(moe_trained, moe_transformed, tmp_path):
    """An optimizer.pt as transformers 4.x's Trainer wrote it for the same model: one module
    per expert, so one 2-D moment per expert tensor, numbered in that model's parameter order
    (the fused parameters of a layer replaced by expert 0's tensors, expert 1's, ...)."""
    family, ckpt, live = moe_trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    sd = _load(ckpt / "optimizer.pt")
    order = PER_EXPERT_ORDER.get(family, ("gate_proj", "up_proj", "down_proj"))
    state, groups, key = {}, [], 0
    for g in sd["param_groups"]:
        params, done = [], set()
        for old in g["params"]:
            n = live[old]
            if not n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                state[key] = sd["state"][old]
                params.append(key)
                key += 1
                continue
            pre = n.rsplit(".", 1)[0]
            if pre in done:
                continue
            done.add(pre)
            pieces = {}
            for fused in (pre + ".gate_up_proj", pre + ".down_proj"):
                old_key = next(k for k, v in live.items() if v == fused)
                for saved, box, e in _experts_of(family, fused, sd["state"][old_key]["exp_avg"].shape):
                    entry = sd["state"][old_key]
                    pieces[saved] = (e, {k: (v[box].clone() if v.dim() else v) for k, v in entry.items()})
            for saved in sorted(pieces, key=lambda s: (pieces[s][0], order.index(s.rsplit(".", 2)[1]))):
                state[key] = pieces[saved][1]
                params.append(key)
                key += 1
        groups.append({**g, "params": params})
    legacy = {"state": state, "param_groups": groups}
    torch.save(legacy, src / "optimizer.pt")
    shapes = tensor_shapes(src)
    names = optimizer_parameter_names(src)
    assert all(n in shapes for n in names.values())       # every position is one checkpoint tensor
    out = tmp_path / "out"
    report = wisca.transform(src, out)
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and "transformers 4.x" in opt["order"]
    mult = wisca.scale_multipliers(out)
    after = _load(out / "optimizer.pt")
    for k, n in names.items():
        s = mult.get(n, torch.ones(1, dtype=torch.float64)).float()
        assert torch.equal(after["state"][k]["exp_avg"], state[k]["exp_avg"] / s), n
        assert torch.equal(after["state"][k]["exp_avg_sq"], state[k]["exp_avg_sq"] / (s * s)), n
    assert any(".experts." in n and n in mult for n in names.values())
    wisca.undo(out, tmp_path / "back")
    assert (tmp_path / "back" / "optimizer.pt").read_bytes() == (src / "optimizer.pt").read_bytes()


def test_moe_by_name_state_with_fused_names(moe_trained, tmp_path):
    """get_optimizer_state_dict of a transformers 5 MoE model: keyed by the in-memory names,
    the experts' moments fused."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    family, ckpt, _ = moe_trained
    src = _copy_checkpoint(ckpt, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.stack([d["input_ids"] for d in _dataset(4)])
    model(batch, labels=batch).loss.backward()
    opt.step()
    state = get_optimizer_state_dict(model, opt)
    assert any(n.endswith("experts.gate_up_proj") for n in state["state"])
    torch.save(state, src / "optim.pt")
    out = tmp_path / "out"
    report = wisca.transform(src, out)
    rec = report["training_state"]["optimizer"]
    assert rec["transformed"] and rec["exact"] and rec["format"] == "by-name"
    mult, after = wisca.scale_multipliers(out), _load(out / "optim.pt")
    for n, entry in state["state"].items():
        boxes = _experts_of(family, n, entry["exp_avg"].shape) if n.endswith("_proj") and ".experts." in n \
            else [(n.replace(".mlp.gate.", ".block_sparse_moe.gate.") if family == "mixtral" else n, (), 0)]
        for saved, box, _ in boxes:
            s = mult.get(saved, torch.ones(1, dtype=torch.float64)).float()
            assert torch.equal(after["state"][n]["exp_avg"][box], entry["exp_avg"][box] / s), saved
