"""MoE checkpoints in torch.distributed checkpoint (DCP) form: a training loop on transformers 5
saves the model as it is in memory, every layer's experts fused in 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]; gpt-oss's and Llama 4's
own fused layouts), with AdamW's moments of those shapes. Each MoE family is saved that way,
transformed, loaded back by ``dcp.load`` into transformers' own model and compared bit for
bit; one is trained under FSDP2 on 2 ranks, so its experts are stored as row chunks over
the expert axis, and transformed under torchrun too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import wisca_cli as wisca
from conftest import ARCH_FAMILIES, FUSED_ON_DISK, REPO, build, eval_logits, probe_tokens, run_cli
from dcp_helpers import assert_rescaled, entries, expected_multipliers, refused

# every MoE family, and the in-memory name of one fused expert tensor per layer it has
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4", "mistral4",
                "granitemoehybrid", "nemotron_h",
                "qwen3_next", "qwen3_5_moe", "gemma4", "deepseek_v4"]
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text",
             "granitemoehybrid", "nemotron_h",
             "mistral4", "qwen3_next", "qwen3_5_moe_text", "gemma4_text", "deepseek_v4")
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
IDS = probe_tokens()
ENV = {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(start):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation="eager")


def _step(model, opt) -> float:
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _load(start, folder):
    """A fresh model (the skewed start's weights, so a load that missed anything shows) and
    AdamW with ``folder`` loaded by dcp.load."""
    model = _model(start)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)                   # the optimizer state exists, to be overwritten
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt, options=FLAT)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=folder, no_dist=True)
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd, options=FLAT)
    return model, opt


def _logits(model):
    return eval_logits(model, IDS)


def test_every_moe_family_is_covered():
    from wisca_cli import spec

    assert {s.name for s in spec.shipped_specs().values() if s.moe is not None} == set(MOE_FAMILIES)


DCP_FAMILIES = [f for f in ARCH_FAMILIES if f not in FUSED_ON_DISK]     # the MoE ones fused, as in memory


@pytest.mark.parametrize("family", DCP_FAMILIES)
def test_every_family_in_dcp_transform_bit_exact(family, tmp_path):
    start = build(tmp_path / "start", family, skew="spec")          # function-identical, unbalanced
    model = _model(start)
    # an MoE spec without experts: Granite 4's dense form, Gemma 4's small models (enable_moe_block off)
    dense = family.endswith("-dense") or not getattr(model.config, "enable_moe_block", True)
    assert any(p.dim() == 3 for n, p in model.named_parameters() if ".experts." in n) == \
        (model.config.model_type in MOE_TYPES and not dense)   # MoE experts fused in memory
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)
    src, dst = tmp_path / "src", tmp_path / "dst"
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT)},
             checkpoint_id=src, no_dist=True)
    model.config.to_json_file(str(src / "config.json"))

    from wisca_cli.spec import spec_for

    spec = spec_for(model.config.model_type)     # every exact target (an MoE's norm target scales the experts' inputs)
    targets = tuple(t for t in ("qk", "vo", "ffn", "norm", "conv") if t in spec.targets and t not in spec.inexact_targets)
    report = wisca.transform(src, dst, targets=targets)
    assert report["format"] == "dcp" and report["verification"]["identical"]
    assert set(report["summary"]) >= set(targets) - {"norm"}
    for pair, s in report["summary"].items():
        assert s["imbalance_after"] < s["imbalance_before"], (pair, s)
    mults = assert_rescaled(src, dst)            # weights x S, exp_avg / S, exp_avg_sq / S**2, rest as it was
    fused = {key: m for key, (name, m) in mults.items() if ".experts." in spec.memory_name(name)}
    if spec.moe is not None and not dense:
        assert fused and all(bool((m != 1).any()) for m in fused.values()), sorted(fused)
        assert all(m.dim() == 3 and m.shape[0] in (1, 4) for m in fused.values())     # per expert, or shared
    assert wisca.verify(src, dst)["verification"]["identical"]   # the verify command's own walk of both
    # transformers' own model, the checkpoint loaded by dcp.load: the same logits, bit for bit
    before, _ = _load(start, src)
    after, after_opt = _load(start, dst)
    assert torch.equal(_logits(before), _logits(after))
    assert torch.isfinite(torch.tensor(_step(after, after_opt)))      # training goes on
    restored = tmp_path / "restored"
    wisca.undo(dst, restored)
    a, b = entries(src), entries(restored)
    assert a.keys() == b.keys()
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


def test_dcp_without_the_hyper_head_is_one_line(tmp_path):
    """A DCP checkpoint of DeepSeek-V4 whose model lacks a tensor beside the layers (its hyper head):
    refused in one line naming it, exit 2, nothing written."""
    start = build(tmp_path / "start", "deepseek_v4", skew=None)
    model = _model(start)
    sd = {k: v for k, v in get_model_state_dict(model).items() if k != "model.hc_head.hc_fn"}
    src = tmp_path / "src"
    dcp.save({"model": sd}, checkpoint_id=src, no_dist=True)
    model.config.to_json_file(str(src / "config.json"))
    refused(src, tmp_path, match="tensor model.hc_head.hc_fn not in the checkpoint")


def _torchrun(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV, **(env or {})})


def test_fsdp2_sharded_experts_under_torchrun(tmp_path):
    """DeepSeek-V3 (MLA, fused routed experts, a shared expert, a dense first layer) trained
    with FSDP2 on 2 ranks: every tensor, the 3-D experts too, is stored as 2 chunks along
    dim 0. Transformed in one process and by a 2-rank torchrun job: the same bytes; loaded
    back into transformers' model, the same logits."""
    start = build(tmp_path / "start", "deepseek_v3", skew="spec")
    src = tmp_path / "src"
    res = _torchrun(REPO / "tests" / "dcp_worker.py", "make-hf", src, start)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    md = dcp.FileSystemReader(src).read_metadata()
    experts = [k for k in md.state_dict_metadata if k.endswith("mlp.experts.gate_up_proj")]
    assert experts and all(len(md.state_dict_metadata[k].chunks) == 2 for k in experts)
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli("transform", src, one, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["verification"]["identical"]
    res = _torchrun("-m", "wisca_cli", "transform", src, two, "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads(res.stdout)["ranks"] == 2
    a, b = entries(one), entries(two)
    assert a.keys() == b.keys()
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())
    mults = assert_rescaled(src, one)
    assert any(".experts.gate_up_proj" in key and bool((m != 1).any()) for key, (_, m) in mults.items())
    assert expected_multipliers(two).keys() == mults.keys()
    before, _ = _load(start, src)
    after, _ = _load(start, two)
    assert torch.equal(_logits(before), _logits(after))
    res = run_cli("verify", src, two, "--json")                   # and the other commands take it
    assert res.returncode == 0 and json.loads(res.stdout)["verification"]["identical"], res.stderr[-2000:]
    res = run_cli("inspect", two, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["architecture"] == "deepseek_v3"


def test_mxfp4_experts_in_dcp_are_refused_in_one_line(tmp_path):
    """gpt-oss as released (experts as MXFP4 uint8 blocks and scales) saved to DCP: refused by
    name, exit 2, nothing written; MXFP4 is read from safetensors only."""
    from safetensors.torch import load_file

    start = build(tmp_path / "start", "gpt_oss", config={"intermediate_size": 32}, skew=None)
    state = {}
    for name, t in load_file(start / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, inner, out = t.shape
            state[name + "_blocks"] = torch.zeros((e, out, inner // 32, 16), dtype=torch.uint8)
            state[name + "_scales"] = torch.full((e, out, inner // 32), 127, dtype=torch.uint8)
        else:
            state[name] = t
    src = tmp_path / "src"
    dcp.save({"model": state}, checkpoint_id=src, no_dist=True)
    cfg = json.loads((start / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    refused(src, tmp_path, match=f"{src}: MXFP4-quantised experts in a torch.distributed checkpoint are not supported")


def test_fp8_weights_in_dcp_are_refused_in_one_line(tmp_path):
    """DeepSeek-V3 with FP8 block-quantised weights (codes + weight_scale_inv) in DCP: refused by
    name, exit 2, nothing written; FP8 is read from safetensors folders only."""
    from safetensors.torch import load_file

    start = build(tmp_path / "start", "deepseek_v3", skew=None)
    state = load_file(start / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    w = state[name]
    state[name] = w.to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = torch.ones((1, 1), dtype=torch.float32)
    src = tmp_path / "src"
    dcp.save({"model": state}, checkpoint_id=src, no_dist=True)
    cfg = json.loads((start / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": list(w.shape)}
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    refused(src, tmp_path, match=f"{src}: FP8 block-quantised weights in a torch.distributed checkpoint are not supported")
