"""The base guarantees: bit-exact by default, verified, the source untouched, undo exact.

Every equivalence claim is checked against transformers' own forward (AutoModelForCausalLM)
on the checkpoint that wisca wrote, not only against our streamed verifier.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

import wisca_cli as wisca
from conftest import FAMILIES, hf_logits, probe_tokens, run_cli, tree_hash

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_default_transform_is_bit_identical_in_transformers(family, dtype, ckpt_dir, tmp_path):
    src = ckpt_dir(family, DTYPES[dtype])
    before = tree_hash(src)
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verification"]["passed"] and report["verification"]["identical"]
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(dst, ids))
    # it did something: every pair kind got non-trivial scales and became more balanced
    for kind in ("qk", "vo", "ffn"):
        s = report["summary"][kind]
        assert s["log2_scale_max"] - s["log2_scale_min"] >= 2
        assert s["imbalance_after"] < s["imbalance_before"]
    assert tree_hash(src) == before


def test_output_layout_matches_source(ckpt_dir, tmp_path):
    src = ckpt_dir("qwen2", torch.float32)
    dst = tmp_path / "out"
    wisca.transform(src, dst)
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(dst / "model.safetensors", "pt") as b:
        assert a.offset_keys() == b.offset_keys()
        for name in a.keys():
            sa, sb = a.get_slice(name), b.get_slice(name)
            assert (sa.get_dtype(), sa.get_shape()) == (sb.get_dtype(), sb.get_shape())
        meta = b.metadata()
        assert meta["format"] == a.metadata()["format"]
        assert json.loads(meta["wisca"])["version"] == wisca.__version__
        changed = {n for n in a.keys() if not torch.equal(a.get_tensor(n), b.get_tensor(n))}
    assert changed == {f"model.layers.{i}.{t}" for i in range(2) for t in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
    for f in ("config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    record = json.loads((dst / "wisca.json").read_text())
    assert record["options"]["scales"] == "pow2" and record["options"]["granularity"] == "channel"
    assert len(record["layers"]) == 2 and "undo" in record
    with safe_open(dst / "wisca_scales.safetensors", "pt") as f:
        assert set(f.keys()) == {f"layers.{i}.{k}" for i in range(2) for k in ("qk", "vo", "ffn")}


def test_sharded_checkpoint_with_a_layer_split_across_shards(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.bfloat16, shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {f for n, f in index.items() if n.startswith("model.layers.0.")}
    assert len(layer0) >= 2, "fixture must split a layer across shards"
    before = tree_hash(src)
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst)
    assert res.returncode == 0, res.stderr
    assert (dst / "model.safetensors.index.json").read_bytes() == (src / "model.safetensors.index.json").read_bytes()
    assert sorted(p.name for p in dst.glob("*.safetensors") if p.name.startswith("model")) == \
        sorted(set(index.values()))
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(dst, ids))
    assert tree_hash(src) == before


# Continuous scales round once per weight: stated tolerances (README "Exactness").
CONTINUOUS_TOL = {"fp32": 1e-5, "bf16": 5e-2}   # max |Δlogit| / max |logit| in transformers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_continuous_scales_within_tolerance(family, dtype, ckpt_dir, tmp_path):
    src = ckpt_dir(family, DTYPES[dtype])
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst, "--scales", "continuous", "--json")
    assert res.returncode == 0, res.stderr
    v = json.loads(res.stdout)["verification"]
    assert v["mode"] == "tolerance" and v["passed"]
    ids = probe_tokens()
    a, b = hf_logits(src, ids, torch.float32), hf_logits(dst, ids, torch.float32)
    assert (a - b).abs().max() / a.abs().max() <= CONTINUOUS_TOL[dtype]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (1.0 if dtype == "fp32" else 0.95)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_reference_forward_matches_transformers(family, ckpt_dir):
    from wisca_cli import forward
    from wisca_cli.checkpoint import open_checkpoint
    from wisca_cli.verifier import StreamVerifier, Tolerance

    src = ckpt_dir(family, torch.float32)
    ids = probe_tokens()
    ref = hf_logits(src, ids)
    ckpt = open_checkpoint(src)
    lay = ckpt.layout
    v = StreamVerifier(lay, ids, exact=True, tolerance=Tolerance())
    emb = ckpt.read(lay.spec.embed)
    v.embed(emb, emb)
    for i in range(lay.layers):
        w = {role: ckpt.read(name) for role, name in lay.layer_roles(i).items()}
        v.layer(i, w, w)
    ours = forward.final_logits(v.h_ref, ckpt.read(lay.spec.final_norm), ckpt.read(lay.spec.lm_head), lay)
    ckpt.close()
    # stated fp32 tolerance of the reference forward: 1e-5 relative to the largest logit
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_inspect_shows_imbalance_dropping(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    pow2, cont = tmp_path / "pow2", tmp_path / "cont"
    assert run_cli("transform", src, pow2).returncode == 0
    assert run_cli("transform", src, cont, "--scales", "continuous", "--granularity", "channel").returncode == 0
    reports = {}
    for name, path in (("src", src), ("pow2", pow2), ("cont", cont)):
        res = run_cli("inspect", path, "--json")
        assert res.returncode == 0, res.stderr
        reports[name] = json.loads(res.stdout)["summary"]
    for kind in ("qk", "vo", "ffn"):
        assert reports["pow2"][kind]["mean_abs_log2"] < reports["src"][kind]["mean_abs_log2"]
        assert reports["pow2"][kind]["max_abs_log2"] <= 1.0 + 1e-6   # pow2: within one factor of 2
        assert reports["cont"][kind]["mean_abs_log2"] < 0.01
    table = run_cli("inspect", src)
    assert table.returncode == 0 and "qk" in table.stdout and "per head" in table.stdout


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_coarser_granularities_are_exact_and_balance_less(granularity, ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    fine = wisca.transform(src, tmp_path / "fine")
    coarse = wisca.transform(src, tmp_path / "coarse", granularity=granularity)
    assert coarse["verification"]["identical"]
    units = {"layer": 2, "head": 2 * 2}   # 2 layers, 2 kv heads
    assert coarse["summary"]["qk"]["units"] == units[granularity]
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "coarse", ids))
    assert fine["summary"]["vo"]["imbalance_after"] <= coarse["summary"]["vo"]["imbalance_after"] + 1e-9


def test_strength_zero_is_the_identity(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    wisca.transform(src, tmp_path / "out", strength=0.0)
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(tmp_path / "out/model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.keys())


def test_rms_norm_balances_per_element(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    rep = wisca.transform(src, tmp_path / "out", norm="rms", scales="continuous")
    assert rep["verification"]["passed"]
    after = wisca.inspect(tmp_path / "out", norm="rms")["summary"]
    assert all(after[k]["mean_abs_log2"] < 0.01 for k in ("qk", "vo", "ffn"))
    fro = wisca.inspect(tmp_path / "out", norm="fro")["summary"]
    # GQA: a group's Q block has R=2 times the elements of its K head, so fro stays off by log2(sqrt 2)
    assert abs(fro["qk"]["mean_abs_log2"] - 0.5) < 0.01


def test_verify_detects_a_single_changed_weight(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    dst = tmp_path / "out"
    assert run_cli("transform", src, dst).returncode == 0
    ok = run_cli("verify", src, dst, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verification"]["identical"]

    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    tensors = load_file(bad / "model.safetensors")
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    q[3, 5] = q[3, 5] * 1.5 + 0.01
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    res = run_cli("verify", src, bad, "--json")
    assert res.returncode == 1
    v = json.loads(res.stdout)["verification"]
    assert not v["passed"] and v["first_diverging_layer"] == 1


def test_verify_rejects_different_architectures(ckpt_dir):
    res = run_cli("verify", ckpt_dir("llama-gqa"), ckpt_dir("llama-mqa"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "not the same architecture" in res.stderr


@pytest.mark.parametrize("dtype", DTYPES)
def test_undo_restores_every_tensor_bit_identically(dtype, ckpt_dir, tmp_path):
    src = ckpt_dir("qwen2", DTYPES[dtype])
    dst, back = tmp_path / "out", tmp_path / "back"
    assert run_cli("transform", src, dst).returncode == 0
    res = run_cli("undo", dst, back)
    assert res.returncode == 0, res.stderr
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(back / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.keys())
        assert a.metadata() == b.metadata()
    assert not (back / "wisca.json").exists()
    assert (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_verification_failure_writes_nothing(ckpt_dir, tmp_path, monkeypatch):
    """A transform whose output does not verify exits 1 and leaves no DST, no temp folder."""
    import wisca_cli.solve as api   # where the scales are applied

    src = ckpt_dir("llama-gqa", torch.float32)
    real = api.apply_scales

    def broken(pair, tensors, s, **kw):       # a bug that scales K by s instead of 1/s
        out = real(pair, tensors, s, **kw)
        if pair.kind == "qk":
            out["k"] = out["k"] * s.double().pow(2).repeat_interleave(out["k"].shape[0] // len(s))[:, None].float()
        return out

    monkeypatch.setattr(api, "apply_scales", broken)
    with pytest.raises(wisca.VerificationFailed, match="layer 0"):
        wisca.transform(src, tmp_path / "out", granularity="head")
    assert list(tmp_path.iterdir()) == []


def test_json_report_and_report_file(ckpt_dir, tmp_path):
    src = ckpt_dir("mistral", torch.float32)
    res = run_cli("transform", src, tmp_path / "out", "--json", "--report", tmp_path / "r.json")
    assert res.returncode == 0
    printed, saved = json.loads(res.stdout), json.loads((tmp_path / "r.json").read_text())
    assert printed["summary"] == saved["summary"]
    assert printed["options"]["targets"] == ["qk", "vo", "ffn"]
    assert printed["verification"]["tokens"] == 64


def test_targets_subset_touches_only_those_tensors(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    rep = wisca.transform(src, tmp_path / "out", targets=("vo",))
    assert set(rep["summary"]) == {"vo"}
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(tmp_path / "out/model.safetensors", "pt") as b:
        changed = {n.split(".")[-2] for n in a.keys() if not torch.equal(a.get_tensor(n), b.get_tensor(n))}
    assert changed == {"v_proj", "o_proj"}


def test_no_verify_warns_and_still_writes_exact_output(ckpt_dir, tmp_path):
    src = ckpt_dir("llama-gqa", torch.float32)
    res = run_cli("transform", src, tmp_path / "out", "--no-verify")
    assert res.returncode == 0
    assert "--no-verify" in res.stderr
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "out", ids))


def test_compare_logits_row_by_row_matches_the_whole_tensor_formulas():
    from wisca_cli.verifier import Tolerance, compare_logits

    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 300, generator=g)
    b = a + 1e-6 * torch.randn(2, 5, 300, generator=g)
    r = compare_logits(a, b, exact=False, tol=Tolerance())
    assert r.max_abs_diff == (a - b).abs().max().item()
    assert r.rel_diff == (a - b).abs().max().item() / a.abs().max().item()
    assert r.passed and not r.identical and r.tokens == 10
    assert compare_logits(a, a.clone(), exact=True, tol=Tolerance()).passed
    nan = b.clone()
    nan[1, 2, 7] = float("nan")
    bad = compare_logits(a, nan, exact=False, tol=Tolerance())
    assert not bad.passed and math.isnan(bad.max_abs_diff)
