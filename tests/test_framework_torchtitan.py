"""torchtitan 0.3.0, tested against itself: checkpoints written by torchtitan's own Llama 3,
Qwen 3 and Qwen 3 MoE classes (3-D routed experts ``w1_EFD``/``w3_EFD``/``w2_EDF``, router and
``expert_bias_E`` untouched), `parallelize_llama` / `parallelize_qwen3` (FSDP2 on 2 ranks, gloo),
`OptimizersContainer` (AdamW) and `CheckpointManager.save`, unbalanced at a fixed function by
exact powers of two and trained 3 steps (``tests/frameworks/torchtitan/make_ckpt.py``; its
deviations from torchtitan's CUDA-only Trainer are named there). wisca transforms
``checkpoint/step-3``; torchtitan's `CheckpointManager.load` reads the output into a fresh model
and optimizer at world size 1 and 2, its forward gives bit-identical logits, and it trains on.

Stock Llama 3 and Qwen 3 flavours set ``fuse_qkv``: the checkpoint holds the weights split
(``qkv_linear.wq/wk/wv``) but the moments fused (``qkv_linear.wqkv.weight.exp_avg``, rows
grouped per kv head): rescaled as slices of one tensor (``frameworks/torchtitan.json``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import run_cli
from dcp_helpers import entries as entries_of
from framework_checks import (FRAMEWORKS, as_step, assert_loaded_exactly, assert_rescaled, assert_undone, load_back,
                              torchrun, transform_both_ways)

pytest.importorskip("torchtitan")
SCRIPTS = FRAMEWORKS / "torchtitan"
FLAVORS = {"llama3": "llama+torchtitan", "llama3-unfused": "llama+torchtitan", "qwen3": "qwen3+torchtitan",
           "qwen3-moe": "qwen3_moe+torchtitan"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchtitan")
    out = {}
    for flavor in FLAVORS:
        folder = root / flavor
        torchrun(2, SCRIPTS / "make_ckpt.py", "--flavor", flavor, "--out", folder)
        out[flavor] = folder
    return out


def _fused(src, flavor: str) -> tuple[dict, int]:
    cfg = json.loads((src / "config.json").read_text())
    if flavor == "llama3-unfused":
        return {}, cfg["num_key_value_heads"]
    fused = {f"layers.{i}.attention.qkv_linear.wqkv.weight":
             tuple(f"layers.{i}.attention.qkv_linear.w{p}.weight" for p in "qkv")
             for i in range(cfg["num_hidden_layers"])}
    return fused, cfg["num_key_value_heads"]


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_torchtitan_resumes_from_the_transformed_checkpoint(made, tmp_path, flavor):
    folder = made[flavor]
    src, config, probe = folder / "checkpoint" / "step-3", folder / "config.json", folder / "probe.pt"
    out = tmp_path / "out"
    report = transform_both_ways(src, out, config)
    assert report["architecture"] == FLAVORS[flavor] and report["name_adapter"] == "torchtitan"
    assert report["verification"]["identical"]
    for kind, s in report["summary"].items():     # every applicable pair kind moved towards balance
        if s["units_changed"]:
            assert s["imbalance_after"] < s["imbalance_before"], kind
    assert report["summary"]["vo"]["units_changed"] and report["summary"]["ffn"]["units_changed"]
    if flavor.startswith("llama"):
        assert report["summary"]["qk"]["units_changed"]
    fused, kv_heads = _fused(folder, flavor)
    checked = assert_rescaled(src, out, "", "optimizer.", fused, kv_heads)
    assert checked["fused"] == 2 * len(fused) and checked["moments"] > 0
    acc = report["training_state"]["optimizer"]["accounting"]
    assert acc["exp_avg"]["scaled"] == checked["exp_avg_scaled"] > 0
    assert sum(acc["exp_avg"].values()) == sum(1 for k in entries_of(src) if k.endswith(".exp_avg"))
    # torchtitan's own loader and forward, at world size 1 and 2, then two more training steps
    step = as_step(out, tmp_path, "step-3")
    for world in (1, 2):
        assert_loaded_exactly(load_back("torchtitan", flavor, step, probe, tmp_path, world), probe)
    assert_undone(src, out, tmp_path)
    assert run_cli("verify", src, out, "--config", config).returncode == 0
    res = run_cli("inspect", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["architecture"] == FLAVORS[flavor], res.stderr


def test_the_interleaved_rotary_pairing_is_needed(tmp_path, monkeypatch):
    """torchtitan's Llama 3 pairs rotary rows (2i, 2i+1). Balanced with HF's pairing (i, i + d/2),
    wisca's own verifier agrees with itself, but torchtitan's forward computes something else:
    the framework's own forward is what catches a wrong description. (The model's odd q rows
    start 8 times larger, so HF's units (i, i + d/2) get scales that split torchtitan's pairs.)"""
    import wisca_cli as wisca
    from wisca_cli.spec import ArchSpec

    folder = tmp_path / "made"
    torchrun(2, SCRIPTS / "make_ckpt.py", "--flavor", "llama3-unfused", "--odd-rows", "3", "--out", folder)
    src, probe = folder / "checkpoint" / "step-3", folder / "probe.pt"
    want = torch.load(probe, weights_only=True)["logits"]
    logits = {}
    for label in ("right", "wrong"):
        if label == "wrong":
            adapted = ArchSpec.adapted
            monkeypatch.setattr(ArchSpec, "adapted", lambda self, name, a: dataclasses.replace(
                adapted(self, name, a), attention=dataclasses.replace(self.attention, rotary="half")))
        out = tmp_path / label
        report = wisca.transform(src, out, config=str(folder / "config.json"))
        assert report["verification"]["identical"] and report["summary"]["qk"]["units_changed"]
        logits[label] = load_back("torchtitan", "llama3-unfused", as_step(out, tmp_path / label, "step-3"), probe,
                                  tmp_path, 1)["logits"]
    assert torch.equal(logits["right"], want)
    assert not torch.equal(logits["wrong"], want)


def test_a_checkpoint_of_another_framework_is_named_in_one_line(made, tmp_path):
    folder = made["llama3"]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mistral"      # a family torchtitan's description does not name
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = run_cli("transform", folder / "checkpoint" / "step-3", tmp_path / "out", "--config", tmp_path / "config.json")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "no tensor named like the mistral embedding in Hugging Face's names (model.embed_tokens.weight)" \
        in lines[0] and "its tensors are named like 'layers.0." in lines[0] and "frameworks/*.json" in lines[0]
    assert not (tmp_path / "out").exists()
