"""gpt-oss with MXFP4-quantised experts (``*_blocks``, ``*_scales``, uint8): copied unchanged.

The fixture builds a tiny gpt-oss with transformers' own class, draws random FP4 codes and
e8m0 scales for its experts, dequantises them with transformers' ``convert_moe_packed_tensors``
into the bf16-layout checkpoint, and writes the same model quantised (the codes and scales,
``quantization_config`` mxfp4): two checkpoints of one function, checked in transformers.
Q/K, V/O and the attention input norm -> q, k, v are then skewed by random powers of two
(the pairs wisca builds for the quantised layout). Asserted: transform exits 0, SRC and OUT
give bit-identical logits in transformers (loaded with ``Mxfp4Config(dequantize=True)``), the
quantised tensors are byte-identical, the imbalance drops for qk, vo and norm, the reference
forward matches transformers within 1e-5, undo restores every tensor bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import wisca_cli as wisca
from conftest import build, probe_tokens, reference_logits, run_cli
from wisca_cli import spec
from wisca_cli.balance import apply_scales
from wisca_cli.checkpoint import open_checkpoint
from wisca_cli.errors import WiscaError
from wisca_cli.mxfp4 import dequantize
from wisca_cli.pairs import layer_pairs

QUANT = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
FUSED = {"gate_up_proj": "in", "down_proj": "in"}   # stored [E, in, out] in the bf16 layout


@torch.no_grad()
def _logits(path, ids, quantised: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, Mxfp4Config

    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if quantised else {}
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, **kwargs)
    return model.eval()(ids).logits


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(quantised, dequantised) folders of one skewed tiny gpt-oss."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("mxfp4")
    deq = build(root / "deq", "gpt_oss", config={"intermediate_size": 32}, skew=None, init="vectors")
    tensors = load_file(deq / "model.safetensors")
    cfg = json.loads((deq / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    quant = {}
    for name in list(tensors):
        if name.split(".")[-1] in FUSED:
            e, inner, out = tensors[name].shape
            blocks = torch.randint(0, 256, (e, out, inner // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(120, 124, (e, out, inner // 32), generator=g, dtype=torch.uint8)
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            tensors[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
            assert torch.equal(tensors[name].transpose(1, 2), dequantize(blocks, scales))   # ours as theirs
    qcfg = {**cfg, "quantization_config": QUANT}
    names = [n for n in tensors if n.split(".")[-1] not in FUSED] + list(quant)
    layout = spec.layout_from_config(qcfg, tensor_names=names)
    assert layout.mxfp4_experts
    for layer in range(layout.layers):   # skew the pairs that hold on the quantised layout
        roles = layout.layer_roles(layer)
        w = {role: tensors[n] for role, n in roles.items() if n in tensors}
        for pair in layer_pairs(layout, layer, ("qk", "vo", "norm"), "channel"):
            assert all(not m.role.startswith("experts.") for m in pair.members)
            s = torch.exp2(torch.round(torch.randn(pair.n_units, generator=g) * 3.0)).double()
            w.update(apply_scales(pair, w, s))
        tensors.update({roles[r]: t.contiguous() for r, t in w.items()})
    save_file(tensors, deq / "model.safetensors", metadata={"format": "pt"})
    src = root / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(qcfg))
    save_file({**{n: t for n, t in tensors.items() if n.split(".")[-1] not in FUSED}, **quant},
              src / "model.safetensors", metadata={"format": "pt"})
    ids = probe_tokens()
    # transformers reads both as one function: the quantised checkpoint is the dequantised one
    assert torch.equal(_logits(src, ids, True), _logits(deq, ids, False))
    return src, deq


def test_transform_copies_the_mxfp4_experts_and_undo_restores(ckpts, tmp_path):
    src, _ = ckpts
    out, back = tmp_path / "out", tmp_path / "back"
    r = run_cli("transform", src, out, "--json")
    assert r.returncode == 0, r.stderr
    assert "MXFP4" in r.stderr and "copied unchanged" in r.stderr
    report = json.loads(r.stdout)
    assert report["verification"]["passed"]
    for kind in ("qk", "vo"):
        assert report["summary"][kind]["imbalance_after"] < report["summary"][kind]["imbalance_before"], kind
    ids = probe_tokens()
    assert torch.equal(_logits(src, ids, True), _logits(out, ids, True))
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    quantised = [n for n in a if n.endswith(("_blocks", "_scales"))]
    assert sorted(report["mxfp4_experts"]["tensors"]) == sorted(quantised) and len(quantised) == 8
    for n in quantised:
        assert b[n].dtype == torch.uint8 and torch.equal(a[n], b[n]), n
    wisca.undo(out, back)
    c = load_file(back / "model.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[n], c[n]) for n in a)


def test_norm_target_leaves_the_norm_the_experts_read(ckpts, tmp_path):
    src, _ = ckpts
    report = wisca.transform(src, tmp_path / "out", targets=("qk", "vo", "norm"))
    assert report["verification"]["passed"]
    assert "not applicable on every layer" in report["warnings"][0]["message"]
    assert report["summary"]["norm"]["imbalance_after"] < report["summary"]["norm"]["imbalance_before"]
    ids = probe_tokens()
    assert torch.equal(_logits(src, ids, True), _logits(tmp_path / "out", ids, True))
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for i in range(2):   # the norm the experts read and the router untouched, the attention input norm balanced
        p = f"model.layers.{i}."
        for n in ("post_attention_layernorm.weight", "mlp.router.weight", "mlp.experts.gate_up_proj_blocks",
                  "mlp.experts.gate_up_proj_scales", "mlp.experts.gate_up_proj_bias"):
            assert torch.equal(a[p + n], b[p + n]), p + n
        assert not torch.equal(a[p + "input_layernorm.weight"], b[p + "input_layernorm.weight"])


def test_inspect_says_the_experts_are_copied_unchanged(ckpts):
    assert "MXFP4" in wisca.inspect(ckpts[0])["warnings"][0]["message"]
    report = wisca.inspect(ckpts[0], targets=("qk", "vo", "norm"))
    assert len(report["mxfp4_experts"]["tensors"]) == 8 and report["mxfp4_experts"]["copied_unchanged"]
    assert "not applicable on every layer" in report["warnings"][0]["message"]
    assert {"qk", "vo", "norm"} <= set(report["summary"])


def test_streamed_reference_forward_dequantises_as_transformers(ckpts):
    src, _ = ckpts
    ids = probe_tokens()
    ref = _logits(src, ids, True)
    ours = reference_logits(src, ids)
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_mxfp4_blocks_of_a_wrong_dtype_are_named(ckpts, tmp_path):
    src, _ = ckpts
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    t = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    t[name] = t[name].float()
    save_file(t, bad / "model.safetensors")
    with pytest.raises(WiscaError, match=rf"model.safetensors: tensor {name} has dtype F32, expected U8 \(MXFP4\)"):
        open_checkpoint(bad)
