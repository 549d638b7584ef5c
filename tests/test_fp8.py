"""DeepSeek-V3 with FP8 block-quantised linear weights (as released): rescaled in that format.

The fixture builds a tiny DeepSeek-V3 with transformers' own class, skews every symmetry of
its spec by random powers of two (``build(skew="spec")``) and all of its MLPs by one more
factor 2**4 (up rows times it, down columns divided: the same function, checked in
transformers), then quantises every linear weight of the layers but the router with
transformers' own quantiser (``Fp8Quantize``: per-block amax / 448, e4m3fn codes, a float32
``weight_scale_inv`` per 16 x 8 block) and writes ``quantization_config`` fp8. Asserted:
transform exits 0 and transformers (``FineGrainedFP8Config(dequantize=True)``) gives
bit-identical logits for SRC and OUT, with blocks folded (a power of two moved into their
``weight_scale_inv``); the imbalance drops for qk, vo and ffn with units that moved and units
the codes clamped, and drops further, with fewer clamped, than with the folds off; every
``weight_scale_inv`` is the original times the recorded powers of two per block (byte-identical
where none) and every code the original times the recorded multiplier over its block's fold;
undo restores every tensor byte for byte (also after the norm target's alternating sweeps fold
a tensor on both axes); the reference forward matches transformers within 1e-5; at one scale
per layer the ffn scales, which would need a code above 448 on one side or the other, are all
clamped to 1 without folds, and take the wanted power of two with them; folds keep
weight_scale_inv normal float32; other quantisations are refused in one line.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import wisca_cli as wisca
from conftest import build, hf_logits, probe_tokens, reference_logits, run_cli
from wisca_cli import fp8, solve
from wisca_cli.balance import apply_scales
from wisca_cli.checkpoint import open_checkpoint
from wisca_cli.errors import WiscaError
from wisca_cli.pairs import layer_pairs
from wisca_cli.spec import layout_from_config

BLOCK = [16, 8]
CONFIG = {"kv_lora_rank": 40, "v_head_dim": 16}   # every linear's sides multiples of the block
FFN_SKEW = 4.0                                     # log2 of the extra factor on every MLP


def _fp8_config(**extra) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK, **extra}


@torch.no_grad()
def _logits(path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True,
        quantization_config=FineGrainedFP8Config(dequantize=True, weight_block_size=BLOCK))
    assert not info["missing_keys"] and not info["unexpected_keys"], info   # every weight read, and dequantised
    return model.eval()(ids).logits


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _is_quantised(name: str, t: torch.Tensor) -> bool:
    """The linear weights DeepSeek quantises: every 2-D weight of a layer but the router."""
    return ".layers." in name and name.endswith(".weight") and t.dim() == 2 and not name.endswith("mlp.gate.weight")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A skewed tiny DeepSeek-V3, FP8 block-quantised by transformers' own quantiser."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    root = tmp_path_factory.mktemp("fp8")
    full = build(root / "fp32", "deepseek_v3", config=CONFIG, skew="spec", init="vectors")
    ids = probe_tokens()
    before = hf_logits(full, ids)
    tensors = load_file(full / "model.safetensors")
    cfg = json.loads((full / "config.json").read_text())
    layout = layout_from_config(cfg, tensor_names=tensors)
    for layer in range(layout.layers):   # every MLP's up rows times 2**4, its down columns / 2**4
        roles = layout.layer_roles(layer)
        w = {role: tensors[n] for role, n in roles.items()}
        for pair in layer_pairs(layout, layer, ("ffn",), "channel"):
            w.update(apply_scales(pair, w, torch.full((pair.n_units,), 2.0 ** FFN_SKEW, dtype=torch.float64)))
        tensors.update({roles[r]: t.contiguous() for r, t in w.items()})
    save_file(tensors, full / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(hf_logits(full, ids), before)   # the extra skew kept the function
    hf = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=BLOCK))
    quantise, dequantise = Fp8Quantize(hf), Fp8Dequantize(hf)
    out = {}
    for name, t in tensors.items():
        if not _is_quantised(name, t):
            out[name] = t
            continue
        q = quantise.convert({name: t})
        scale = fp8.SCALE_NAME.join(name.rsplit("weight", 1))
        assert set(q) == {name, scale} and q[name].dtype == torch.float8_e4m3fn, name
        # ours dequantises as transformers does, bit for bit
        theirs = dequantise._dequantize_one(q[name], q[scale], output_dtype=torch.float32)
        assert torch.equal(fp8.dequantize(q[name], q[scale], tuple(BLOCK)), theirs), name
        out.update(q)
    src = root / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": _fp8_config()}))
    save_file(out, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def transformed(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8-out") / "out"
    r = run_cli("transform", ckpt, out, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout), r.stderr


def test_transform_is_bit_exact_in_transformers(ckpt, transformed):
    out, report, stderr = transformed
    assert report["verification"]["passed"] and report["verification"]["mode"] == "exact"
    assert report["fp8_folded_blocks"] > 0   # some blocks moved a power of two into weight_scale_inv
    assert "FP8 block-quantised" in stderr and "moved into weight_scale_inv" in stderr
    assert f"{report['fp8_folded_blocks']} blocks folded a power of two into weight_scale_inv" in stderr
    ids = probe_tokens()
    assert torch.equal(_logits(ckpt, ids), _logits(out, ids))


def test_imbalance_drops_with_units_moved_and_units_clamped(transformed):
    _, report, stderr = transformed
    summary = report["summary"]
    for kind in ("qk", "vo", "ffn"):
        s = summary[kind]
        assert s["imbalance_after"] < s["imbalance_before"], kind
        assert s["units_changed"] > 0, kind         # the limits leave room to move
        assert 0 < s["fp8_clamped"] <= s["clamped"], kind
        assert s["fp8_folded_blocks"] > 0, kind
    clamped = sum(summary[k]["fp8_clamped"] for k in ("qk", "vo", "ffn"))
    assert report["fp8_clamped_units"] == clamped
    assert report["fp8_folded_blocks"] == sum(summary[k]["fp8_folded_blocks"] for k in ("qk", "vo", "ffn"))
    assert report["fp8"]["units"] == sum(summary[k]["units"] for k in ("qk", "vo", "ffn"))
    assert report["fp8"]["block_size"] == BLOCK and report["fp8"]["scale_inv_copied_unchanged"] is False
    assert f"{clamped} of {report['fp8']['units']} units on FP8 weights were clamped" in stderr
    assert any(f"{clamped} of" in w["message"] for w in report["warnings"])


def _folds(out, a: dict) -> dict:
    """FP8 weight name -> (row-block b, column-block b), int64, summed over the record's pairs."""
    from wisca_cli.solve import fold_parse

    scales = load_file(out / "wisca_scales.safetensors")
    roles = [open_checkpoint(out).layout.layer_roles(i) for i in range(2)]
    folds = {}
    for key, b in scales.items():
        parsed = fold_parse(key)
        if parsed is None:
            continue
        assert b.dtype == torch.int16 and bool((b != 0).any()), key   # only nonzero folds are recorded
        layer = int(key.split(".")[1])
        name = roles[layer][parsed[1]]
        scale = a[fp8.SCALE_NAME.join(name.rsplit("weight", 1))]
        both = folds.setdefault(name, [torch.zeros(scale.shape[0], dtype=torch.long),
                                       torch.zeros(scale.shape[1], dtype=torch.long)])
        both[parsed[2]] = both[parsed[2]] + b.long()
    return folds


def test_scale_inv_folded_per_block_and_codes_scaled_by_the_rest(ckpt, transformed):
    """Every weight_scale_inv is the source's times 2**(row-block b + column-block b) as
    recorded (byte-identical where no fold applied), every code the source's times the
    recorded multiplier over 2**b of its blocks: the dequantised weight times the multiplier."""
    out, report, _ = transformed
    a, b = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    mults = wisca.scale_multipliers(out)
    folds = _folds(out, a)
    recorded = load_file(out / "wisca_scales.safetensors")   # per pair (a block two pairs fold counts twice)
    assert sum(int((v != 0).sum()) for k, v in recorded.items() if ".fp8_fold." in k) == report["fp8_folded_blocks"]
    scales = [n for n in a if n.endswith(fp8.SCALE_NAME)]
    codes = [n for n in a if a[n].dtype == torch.float8_e4m3fn]
    assert len(scales) == len(codes) == report["fp8"]["weights"] > 0
    changed = kept = 0
    for n in codes:
        sn = fp8.SCALE_NAME.join(n.rsplit("weight", 1))
        assert b[n].dtype == torch.float8_e4m3fn and b[sn].dtype == torch.float32, n
        rows, cols = folds.get(n, (torch.zeros(a[sn].shape[0], dtype=torch.long),
                                   torch.zeros(a[sn].shape[1], dtype=torch.long)))
        fold = torch.exp2((rows[:, None] + cols[None, :]).double())
        assert torch.equal(b[sn].double(), a[sn].double() * fold), sn    # powers of two per block only
        if n not in folds:
            assert torch.equal(_raw(a[sn]), _raw(b[sn])), sn             # no fold: byte for byte
        kept += n not in folds
        s = mults.get(n, torch.ones(1, 1, dtype=torch.float64))
        mant, _ = torch.frexp(s)
        assert bool((mant == 0.5).all()), n                             # powers of two only
        per_code = fold.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
        assert torch.equal(b[n].double(), a[n].double() * s / per_code), n   # every code, exactly
        assert torch.equal(_dequantised(b, n).double(), _dequantised(a, n).double() * s), n
        changed += not torch.equal(_raw(a[n]), _raw(b[n]))
    assert changed > 0 and len(folds) > 0 and kept > 0


def test_undo_restores_every_tensor_byte_for_byte(ckpt, transformed, tmp_path):
    out, _, _ = transformed
    back = tmp_path / "back"
    wisca.undo(out, back)
    a, c = load_file(ckpt / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == c.keys()
    for n in a:
        assert a[n].dtype == c[n].dtype and torch.equal(_raw(a[n]), _raw(c[n])), n


def test_undo_refuses_a_fold_of_the_wrong_size_in_one_line(transformed, tmp_path):
    import shutil

    from safetensors.torch import load

    from wisca_cli.record import save_tensors

    out, _, _ = transformed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    scales = load((bad / "wisca_scales.safetensors").read_bytes())   # not mapped: the file is rewritten
    key = next(k for k in sorted(scales) if ".fp8_fold." in k)
    save_tensors(bad / "wisca_scales.safetensors", {**scales, key: scales[key][:-1]})
    r = run_cli("undo", bad, tmp_path / "back")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and f"scales {key} missing or of the wrong size" in r.stderr, r.stderr
    assert not (tmp_path / "back").exists()


def test_streamed_reference_forward_dequantises_as_transformers(ckpt):
    ids = probe_tokens()
    ref = _logits(ckpt, ids)
    ours = reference_logits(ckpt, ids)
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def _dequantised(t: dict, name: str) -> torch.Tensor:
    codes, scale = t[name].float(), t[fp8.SCALE_NAME.join(name.rsplit("weight", 1))]
    return codes * scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)


def test_one_scale_per_layer_is_clamped_without_folds_and_moves_with_them(ckpt, tmp_path, monkeypatch):
    """One ffn unit per layer holds every up row and down column, and each block of them has a
    code at 448: s > 1 would push an up code above it, s < 1 a down code. So without folds every
    ffn scale is 1, and the units the codes clamped are the layers whose balance (from the
    dequantised weights, computed here) wanted another power of two. With folds, the up row
    blocks and the down column blocks move that power of two into weight_scale_inv: every unit
    takes its wanted scale, none clamped."""
    t = load_file(ckpt / "model.safetensors")
    wanted = []
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        ups = [n for n in t if n.startswith(p) and n.endswith("up_proj.weight")]
        a = sum(_dequantised(t, n).double().square().sum() for n in ups)
        b = sum(_dequantised(t, n.replace("up_proj", "down_proj")).double().square().sum() for n in ups)
        wanted.append(round(float(torch.log2((b / a) ** 0.25))))
        assert all(int((t[n].view(torch.uint8) & 0x7F).max()) == 0x7E for n in ups)   # a code at 448
    assert all(k != 0 for k in wanted)   # the fixture's extra 2**4 on every MLP wants about s = 2**-4
    folded = wisca.transform(ckpt, tmp_path / "folded", granularity="layer")
    assert folded["verification"]["passed"]
    ffn = folded["summary"]["ffn"]
    assert ffn["units_changed"] == 2 and ffn["fp8_clamped"] == 0 and ffn["fp8_folded_blocks"] > 0
    got = load_file(tmp_path / "folded" / "wisca_scales.safetensors")
    assert [int(torch.log2(got[f"layers.{i}.ffn"]).item()) for i in range(2)] == wanted
    monkeypatch.setattr(solve, "FOLD", False)
    report = wisca.transform(ckpt, tmp_path / "out", granularity="layer")
    assert report["verification"]["passed"]
    ffn = report["summary"]["ffn"]
    assert ffn["units"] == 2 and ffn["units_changed"] == 0 and ffn["fp8_folded_blocks"] == 0
    assert ffn["fp8_clamped"] == 2 and report["fp8_folded_blocks"] == 0
    assert report["fp8"]["scale_inv_copied_unchanged"] is True
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(_raw(t[n]), _raw(out[n])) for n in t if n.endswith(fp8.SCALE_NAME))


def test_folds_lower_the_imbalance_and_the_clamped_units(ckpt, transformed, tmp_path, monkeypatch):
    """The fixture's codes bind the limits (units clamped): the same transform without folds
    leaves more units clamped and more imbalance, on every pair kind."""
    _, folded, _ = transformed
    monkeypatch.setattr(solve, "FOLD", False)
    plain = wisca.transform(ckpt, tmp_path / "out")
    assert plain["verification"]["passed"] and plain["fp8_folded_blocks"] == 0
    assert folded["fp8_clamped_units"] < plain["fp8_clamped_units"]
    for kind in ("qk", "vo", "ffn"):
        f, p = folded["summary"][kind], plain["summary"][kind]
        assert f["imbalance_before"] == pytest.approx(p["imbalance_before"], rel=1e-12), kind
        assert f["imbalance_after"] < p["imbalance_after"] and f["fp8_clamped"] < p["fp8_clamped"], kind


def test_folds_respect_the_float32_range_of_scale_inv():
    """A block's fold keeps its weight_scale_inv values normal float32: near the top of the
    range it cannot go up, near the bottom not down, and an inexact fold is refused."""
    from wisca_cli.pairs import Member

    member = Member("w", 0, torch.arange(4), +1)
    cases = [   # (every code, wanted k, block 0's scale_inv, its b): block 1 (scale_inv 1) takes the wanted k
        (2.0 ** -9, -3, 1.0, -3), (2.0 ** -9, -3, 2.0 ** -123, -3),   # 2**-9 codes cannot go down: b does
        (2.0 ** -9, -3, 2.0 ** -124, 0),                               # 2**-127 would be subnormal: no fold
        (448.0, 3, 2.0 ** 124, 3), (448.0, 3, 2.0 ** 125, 0)]          # 448 cannot go up; 2**128 overflows
    for code, want, top, expect in cases:
        codes = torch.full((4, 2), code).to(torch.float8_e4m3fn)
        scale = torch.tensor([[top], [1.0]])
        tensors = {"w": codes, "w" + fp8.SCALE_SUFFIX: scale}
        slices = fp8.pair_slices([member], tensors, (2, 2))
        b = fp8.choose_folds(slices, torch.full((4,), want), tensors)[("w", 0)]
        assert b.tolist() == [expect, want], (code, top)
        folded = fp8.fold_scale_inv(scale, b)
        assert torch.equal(folded.double(), scale.double() * torch.exp2(b.double()).view(-1, 1))
        assert float(folded[0, 0]) >= torch.finfo(torch.float32).tiny
    assert fp8.scale_fold_range(torch.tensor([[2.0 ** 127]]), 0)[1].item() == 0     # 2**127 cannot go up
    with pytest.raises(fp8.Fp8NotExact):
        fp8.fold_scale_inv(torch.tensor([[2.0 ** 127]]), torch.tensor([1]))
    with pytest.raises(fp8.Fp8NotExact):
        fp8.fold_scale_inv(torch.tensor([[1.0 + 2.0 ** -23]]), torch.tensor([-140]))


def test_scaled_codes_are_checked_and_never_written_inexact(ckpt, tmp_path, monkeypatch):
    codes = torch.tensor([[448.0, 1.0], [2.0 ** -9, 3.0]]).to(torch.float8_e4m3fn)
    lo, hi = fp8.exponent_limits(codes, 0)
    assert lo.tolist() == [-9, 0] and hi.tolist() == [0, 7]   # 448 cannot go up, 2**-9 cannot go down
    for vec in ([2.0, 1.0], [1.0, 0.5]):
        with pytest.raises(fp8.Fp8NotExact):
            fp8.scale_codes(codes, 0, torch.tensor(vec, dtype=torch.float64))
    assert torch.equal(fp8.scale_codes(codes, 0, torch.tensor([1.0, 128.0], dtype=torch.float64)).float()[1],
                       torch.tensor([2.0 ** -2, 384.0]))
    # every magnitude code against every k: exact exactly inside the limits
    values = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for k in range(-20, 21):
        scaled = values * 2.0 ** k
        exact = scaled.to(torch.float8_e4m3fn).float() == scaled
        assert torch.equal(exact, (fp8.KMIN[:127] <= k) & (k <= fp8.KMAX[:127])), k
    # with the limits switched off the balance asks for inexact codes: the run stops, nothing written
    monkeypatch.setattr(fp8, "unit_exponents", lambda slices, n, folds=None: (
        torch.full((n,), -60, dtype=torch.long), torch.full((n,), 60, dtype=torch.long)))
    with pytest.raises(fp8.Fp8NotExact):
        wisca.transform(ckpt, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     r"config.json: quantization_config=\{\"quant_method\": \"bitsandbytes\".* is not supported for deepseek_v3: "
     r"only FP8 block-quantised weights"),
    (_fp8_config(fmt="e5m2"), r"config.json: quantization_config: fmt \"e5m2\" is not supported"),
    (_fp8_config(weight_block_size=None), r"config.json: quantization_config: weight_block_size null is not supported"),
])
def test_other_quantisations_are_refused_in_one_line(ckpt, tmp_path, quant, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    (bad / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    r = run_cli("transform", bad, tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    import re
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_continuous_scales_and_broken_fp8_tensors_are_refused(ckpt, tmp_path):
    r = run_cli("transform", ckpt, tmp_path / "out", "--scales", "continuous")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "FP8 block-quantised weights take power-of-two scales only" in r.stderr
    t = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    cases = {
        "no-scale": ({k: v for k, v in t.items() if k != fp8.SCALE_NAME.join(name.rsplit("weight", 1))},
                     rf"tensor {name} has dtype F8_E4M3, expected a float dtype \(FP8 weights are read as a "
                     r"decoder layer's X.weight beside its X.weight_scale_inv, as released\)"),
        "scale-shape": ({**t, name[:-6] + fp8.SCALE_NAME: torch.ones(4, 4)},
                        rf"tensor {name[:-6]}{fp8.SCALE_NAME} has shape \[4, 4\], expected \[4, 8\] from config.json "
                        r"\(weight_block_size \[16, 8\]\)"),
        "scale-dtype": ({**t, name[:-6] + fp8.SCALE_NAME: torch.ones(4, 8, dtype=torch.bfloat16)},
                        rf"tensor {name[:-6]}{fp8.SCALE_NAME} has dtype BF16, expected F32"),
    }
    for case, (tensors, message) in cases.items():
        bad = tmp_path / case
        bad.mkdir()
        (bad / "config.json").write_text((ckpt / "config.json").read_text())
        save_file(tensors, bad / "model.safetensors")
        with pytest.raises(WiscaError, match=message):
            open_checkpoint(bad)
    # a NaN code (e4m3fn S.1111.111) in a weight the balance reads (o_proj) and in one it does not (q_a_proj)
    for victim in (name, "model.layers.1.self_attn.q_a_proj.weight"):
        codes = t[victim].clone()
        codes.view(torch.uint8)[3, 5] = 0x7F
        bad = tmp_path / ("nan-" + victim.split(".")[-2])
        bad.mkdir()
        (bad / "config.json").write_text((ckpt / "config.json").read_text())
        save_file({**t, victim: codes}, bad / "model.safetensors")
        with pytest.raises(WiscaError, match=rf"model.safetensors: tensor {victim} contains NaN or Inf"):
            wisca.transform(bad, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_inspect_says_the_checkpoint_is_fp8(ckpt, transformed):
    report = wisca.inspect(ckpt)
    assert "FP8 block-quantised" in report["warnings"][0]["message"]
    assert report["fp8"]["block_size"] == BLOCK and report["fp8"]["weights"] > 0
    out, after, _ = transformed
    again = wisca.inspect(out)   # the pattern before, rebuilt from the record, is the source's
    for kind in ("qk", "vo", "ffn"):
        assert again["before"]["summary"][kind]["mean_abs_log2"] == pytest.approx(
            report["summary"][kind]["mean_abs_log2"], rel=1e-9)
        assert again["summary"][kind]["mean_abs_log2"] == pytest.approx(after["summary"][kind]["imbalance_after"],
                                                                         rel=1e-9)


def test_transition_refuses_fp8_weights_in_memory():
    from transformers import AutoModelForCausalLM

    from conftest import family_config, make_config

    model_type, overrides = family_config("deepseek_v3")
    model = AutoModelForCausalLM.from_config(make_config(model_type, **{**overrides, **CONFIG}))
    o = model.model.layers[0].self_attn.o_proj   # as FP8Linear holds it: e4m3fn codes
    o.weight = torch.nn.Parameter(o.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(WiscaError, match=r"FP8-quantised weights in memory are not supported"):
        wisca.transition(model)
    assert all(torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                           before[n].view(torch.uint8) if p.dtype == torch.float8_e4m3fn else before[n])
               for n, p in model.named_parameters())


def test_ragged_blocks_dequantise_as_transformers_fp8_kernels_do():
    """DeepSeek-V3's kv_a_proj_with_mqa is [576, 7168]: its last row block is partial. Ours
    matches transformers' own block dequantisation (``_dequantize_fp8_weight``, ceil blocks) there."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(40, 20, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(*fp8.scale_shape((40, 20), (16, 8)), generator=g) * 1e-3
    assert scale.shape == (3, 3)
    ours = fp8.dequantize(codes, scale, (16, 8))
    assert torch.equal(ours, _dequantize_fp8_weight(codes, scale, [16, 8], torch.float32))
    rows = torch.cat([r for _, r in fp8.dequantized_rows(codes, scale, (16, 8), rows=16)])   # block by block
    assert torch.equal(rows, ours) and ours[39, 19] == codes[39, 19].float() * scale[2, 2]


def test_norm_target_alternates_on_fp8_columns_and_undoes(ckpt, tmp_path):
    """The norm target scales FP8 input columns (q_a, kv_a, the MLPs' gate and up; q_b and kv_b
    behind the latent norms) and overlaps qk, vo and ffn: the alternating sweeps rescale the
    same codes again, each step checked, and undo takes the product of the sweeps back out."""
    out, back = tmp_path / "out", tmp_path / "back"
    report = wisca.transform(ckpt, out, targets=("qk", "vo", "ffn", "norm"))
    assert report["verification"]["passed"]
    norm = report["summary"]["norm"]
    assert norm["imbalance_after"] < norm["imbalance_before"] and norm["units_changed"] > 0
    assert norm["fp8_clamped"] > 0 and norm["fp8_folded_blocks"] > 0
    a = load_file(ckpt / "model.safetensors")
    folds = _folds(out, a)   # the sweeps fold some tensors on both axes (q_b: rows by qk, columns by norm)
    assert any(bool((r != 0).any()) and bool((c != 0).any()) for r, c in folds.values())
    ids = probe_tokens()
    assert torch.equal(_logits(ckpt, ids), _logits(out, ids))
    wisca.undo(out, back)
    a, c = load_file(ckpt / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(_raw(a[n]), _raw(c[n])) for n in a)
