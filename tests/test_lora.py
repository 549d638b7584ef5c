"""LoRA adapters: balance lora_A / lora_B per rank channel, exactly, and undo it exactly.

Adapters are made by PEFT itself (LoraConfig + get_peft_model on a tiny GQA llama, a few
training steps so that B is not zero, save_pretrained), and every equivalence claim is
checked with PEFT's own forward (PeftModel.from_pretrained) as well as wisca's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_config, probe_tokens, tree_hash
from wisca_cli import lora
from wisca_cli.errors import WiscaError
from wisca_cli.lora import is_adapter, transform_adapter, undo_adapter

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECORD_FILES = {"wisca.json", "wisca_scales.safetensors"}


def _base_model(path: Path | None = None):
    from transformers import AutoModelForCausalLM

    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                            attn_implementation="eager")


def _lora_config(**kw):
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, **kw)


def _train(model, steps: int = 4, lr: float = 2e-3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "base"
    _base_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A trained adapter on every projection, with per-module rank and alpha overrides."""
    torch.manual_seed(1)
    model = peft.get_peft_model(_base_model(base), _lora_config(rank_pattern={"q_proj": 4},
                                                                alpha_pattern={"down_proj": 4}))
    _train(model)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(path)
    return path


@torch.no_grad()
def _peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(_base_model(base), str(adapter))
    model.eval()
    return model(ids).logits


def _products(folder: Path) -> dict[str, torch.Tensor]:
    t = load_file(folder / "adapter_model.safetensors")
    return {n[:-len(".lora_A.weight")]: t[n.replace("lora_A", "lora_B")] @ a
            for n, a in t.items() if n.endswith(".lora_A.weight")}


def test_balanced_adapter_is_bit_identical_in_peft(base, adapter, tmp_path):
    assert is_adapter(adapter) and not is_adapter(base)
    before = tree_hash(adapter)
    out = tmp_path / "out"
    report = transform_adapter(adapter, out, base=base)
    s = report["summary"]["lora"]
    assert s["modules"] == 14 and s["units"] == 12 * 8 + 2 * 4 and s["dead"] == 0
    assert s["imbalance_after"] <= 1.0 < 3.0 < s["imbalance_before"]   # pow2 leaves |log2| <= 1 per unit
    assert s["log2_scale_min"] <= -2          # B is small early in training: A shrinks, B grows
    v = report["verification"]
    assert v["passed"] and v["mode"] == "exact" and v["products"]["identical"]
    assert v["base"]["passed"] and v["base"]["identical"]
    # B A of every module bit-identical, while A and B themselves changed
    p, q = _products(adapter), _products(out)
    assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and sum(not torch.equal(a[k], b[k]) for k in a) == 28
    # PEFT's own forward: base + adapter logits bit-identical
    ids = probe_tokens()
    assert torch.equal(_peft_logits(base, adapter, ids), _peft_logits(base, out, ids))
    # the record, the scales, the other files
    record = json.loads((out / "wisca.json").read_text())
    assert record["kind"] == "lora-adapter" and record["record_format"] == 1
    assert len(record["modules"]) == 14 and record["scales_file"] == "wisca_scales.safetensors"
    scales = load_file(out / "wisca_scales.safetensors")
    assert set(scales) == {f"base_model.model.{m['module']}" for m in record["modules"]}
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    assert tree_hash(adapter) == before


def test_reference_merge_matches_peft(base, adapter):
    """wisca's base + adapter forward merges scaling * B A with PEFT's scaling (alpha / r,
    rank_pattern, alpha_pattern): its merged model matches PEFT's logits."""
    config, tensors, _, modules = lora.read_adapter(adapter)
    by_key = {m.key: m for m in modules}
    assert by_key["model.layers.0.self_attn.q_proj"].rank == 4
    assert by_key["model.layers.0.self_attn.q_proj"].scaling == 16 / 4
    assert by_key["model.layers.0.mlp.down_proj"].scaling == 4 / 8
    assert by_key["model.layers.0.mlp.up_proj"].scaling == 16 / 8
    weights = load_file(base / "model.safetensors")
    for name, d in lora._deltas(modules, tensors, False).items():
        weights[name] = weights[name] + d
    merged = _base_model(base)
    merged.load_state_dict(weights)
    merged.eval()
    ids = probe_tokens()
    with torch.no_grad():
        want, got = _peft_logits(base, adapter, ids), merged(ids).logits
    assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())


def test_fresh_adapter_has_nothing_to_balance(base, tmp_path):
    model = peft.get_peft_model(_base_model(base), _lora_config())
    src = tmp_path / "fresh"
    model.save_pretrained(src)
    out = tmp_path / "out"
    report = transform_adapter(src, out, base=base)
    s = report["summary"]["lora"]
    assert s["nothing_to_balance"] and s["dead"] == s["units"] == 14 * 8
    assert "nothing to balance" in report["note"]
    assert report["verification"]["passed"]
    got = tree_hash(out)
    assert set(got) - set(tree_hash(src)) == RECORD_FILES
    assert {k: v for k, v in got.items() if k not in RECORD_FILES} == tree_hash(src)


def test_dora_adapter_stays_bit_identical_in_peft(base, tmp_path):
    """DoRA's magnitude reads B A only: balancing A and B leaves PEFT's DoRA forward unchanged."""
    torch.manual_seed(2)
    model = peft.get_peft_model(_base_model(base), _lora_config(use_dora=True))
    _train(model, steps=3)
    src, out = tmp_path / "dora", tmp_path / "out"
    model.save_pretrained(src)
    report = transform_adapter(src, out)
    assert report["summary"]["lora"]["log2_scale_min"] < 0 and report["verification"]["identical"]
    ids = probe_tokens()
    assert torch.equal(_peft_logits(base, src, ids), _peft_logits(base, out, ids))
    with pytest.raises(WiscaError, match="not supported for DoRA"):
        transform_adapter(src, tmp_path / "out2", base=base)


def test_undo_restores_every_tensor_bit_identically(adapter, tmp_path):
    out, back = tmp_path / "out", tmp_path / "back"
    transform_adapter(adapter, out)
    report = undo_adapter(out, back)
    assert report["verification"]["passed"]
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert not (set(tree_hash(back)) & RECORD_FILES)
    with pytest.raises(WiscaError, match="no wisca.json"):
        undo_adapter(adapter, tmp_path / "again")


def test_continuous_scales_balance_within_tolerance(base, adapter, tmp_path):
    report = transform_adapter(adapter, tmp_path / "out", pow2=False, base=base)
    s, v = report["summary"]["lora"], report["verification"]
    assert s["imbalance_after"] < 0.01 < s["imbalance_before"]
    assert v["mode"] == "tolerance" and v["passed"] and v["products"]["max_rel_diff"] <= 1e-5
    assert v["base"]["passed"] and v["base"]["top1"] == 1.0


def test_failed_verification_writes_nothing(base, adapter, tmp_path, monkeypatch):
    from wisca_cli import balance
    from wisca_cli.errors import VerificationFailed

    real = balance.apply_scales

    def off_by_one_ulp(pair, tensors, s, inplace=False):
        out = real(pair, tensors, s, inplace)
        out["lora_B"] = torch.nextafter(out["lora_B"], torch.full_like(out["lora_B"], torch.inf))
        return out

    monkeypatch.setattr(balance, "apply_scales", off_by_one_ulp)
    with pytest.raises(VerificationFailed, match="differ at module model.layers.*nothing written") as e:
        transform_adapter(adapter, tmp_path / "out", base=base)
    assert e.value.report["verification"]["products"]["identical"] is False
    assert list(tmp_path.iterdir()) == []


def _broken_copy(adapter: Path, dst: Path, config=None, tensors=None) -> Path:
    shutil.copytree(adapter, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        tensors(t)
        save_file(t, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
K0 = "base_model.model.model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize("case, config, tensors, message", [
    ("no r", {"r": None}, None, r"adapter_config.json: field 'r' must be a positive integer"),
    ("no alpha", {"lora_alpha": None}, None, r"adapter_config.json: field 'lora_alpha' must be a number"),
    ("not lora", {"peft_type": "IA3"}, None, r"peft_type 'IA3' is not a LoRA adapter"),
    ("rank mismatch", None, lambda t: t.update({f"{K0}.lora_B.weight": torch.zeros(32, 7)}),
     r"adapter_model.safetensors: .*k_proj: lora_A has rank 8 .* but lora_B has 7"),
    ("rank vs config", {"r": 16, "rank_pattern": {}}, None, r"rank 8 does not match r = 16"),
    ("lonely A", None, lambda t: t.pop(f"{K0}.lora_B.weight"), r"k_proj.lora_A.weight has no lora_B partner"),
    ("vector", None, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4)}), r"must be a floating-point matrix"),
    ("nan", None, lambda t: t[f"{K0}.lora_A.weight"].__setitem__((0, 0), float("nan")), r"contains NaN or Inf"),
])
def test_bad_adapters_are_refused(adapter, tmp_path, case, config, tensors, message):
    src = _broken_copy(adapter, tmp_path / "bad", config, tensors)
    with pytest.raises(WiscaError, match=message):
        transform_adapter(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]     # no temporary folder left either


def test_not_an_adapter_and_wrong_base(base, adapter, tmp_path):
    with pytest.raises(WiscaError, match="not a PEFT adapter folder"):
        transform_adapter(base, tmp_path / "out")
    other = tmp_path / "other-base"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=48)).save_pretrained(other)
    with pytest.raises(WiscaError, match=r"update of model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                         r".* not this adapter's base"):
        transform_adapter(adapter, tmp_path / "out", base=other)
    assert not (tmp_path / "out").exists()


def test_adapter_trainer_checkpoint_carries_the_optimizer_state(base, tmp_path):
    """A Trainer checkpoint of a PEFT model: optimizer.pt over the LoRA parameters only."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from wisca_cli.training import optimizer_parameter_names

    model = peft.get_peft_model(_base_model(base), _lora_config())
    _train(model, steps=3)                       # B != 0 before Trainer's steps
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, learning_rate=1e-3,
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], dataloader_num_workers=0,
                             weight_decay=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert is_adapter(ckpt) and (ckpt / "optimizer.pt").is_file()
    names = {id(p): n.replace(".default", "") for n, p in model.named_parameters()}
    live = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    # base_model_name_or_path in adapter_config.json is the base folder: no base= needed
    assert optimizer_parameter_names(ckpt) == dict(enumerate(live))

    out = tmp_path / "out"
    report = transform_adapter(ckpt, out)
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["format"] == "hf-trainer" and opt["scaled_parameters"] > 0
    scales = load_file(out / "wisca_scales.safetensors")
    before = torch.load(ckpt / "optimizer.pt", weights_only=True)
    after = torch.load(out / "optimizer.pt", weights_only=True)
    for i, name in enumerate(live):
        prefix, side = name.rsplit(".lora_", 1)
        s = scales[prefix].double()
        mult = s[:, None] if side.startswith("A") else 1 / s[None, :]
        for k, p in (("exp_avg", 1), ("exp_avg_sq", 2)):
            assert torch.equal(after["state"][i][k], before["state"][i][k] / (mult ** p).float()), (name, k)
    back = tmp_path / "back"
    assert undo_adapter(out, back)["training_state"]["optimizer"]["transformed"]
    assert (back / "optimizer.pt").read_bytes() == (ckpt / "optimizer.pt").read_bytes()


# -- through the command line, once api.transform / api.undo route adapters here ------------------
def _cli(*args):
    from conftest import run_cli

    res = run_cli(*args)
    if res.returncode in (2, 3) and ("No such option: --base" in res.stderr or "config.json not found" in res.stderr):
        pytest.skip("wisca transform does not route adapters to transform_adapter yet (integration pending)")
    return res


def test_cli_adapter_transform_and_undo(base, adapter, tmp_path):
    out, back = tmp_path / "out", tmp_path / "back"
    res = _cli("transform", adapter, out, "--base", base, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kind"] == "lora-adapter" and report["verification"]["base"]["identical"]
    res = _cli("transform", adapter, tmp_path / "human", "--base", base)
    assert res.returncode == 0 and "B A of 14 modules and base + adapter logits" in res.stdout
    res = _cli("undo", out, back, "--json")
    assert res.returncode == 0, res.stderr
    assert (back / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_cli_fresh_adapter_exits_0(base, tmp_path):
    src = tmp_path / "fresh"
    peft.get_peft_model(_base_model(base), _lora_config()).save_pretrained(src)
    res = _cli("transform", src, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "nothing to balance" in res.stdout
