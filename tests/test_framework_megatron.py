"""Megatron-core, tested against itself: torch_dist checkpoints written by megatron-core 0.19.2
and 0.15.3 (``GPTModel`` with the local layer spec, dense or with SequentialMLP experts,
``get_megatron_optimizer``, a few training
steps, ``dist_checkpointing.save`` as Megatron-LM calls it, the tracker file beside ``iter_N/``;
``tests/frameworks/megatron/mc_harness.py``, with its few CPU shims named there), unbalanced at
a fixed function by exact powers of two. wisca transforms them without megatron installed and
megatron-core's own ``dist_checkpointing.load`` reads the output into fresh models and
optimizers at TP 1 and TP 2 (MoE: TP 1; megatron's MoE at TP 2 needs sequence parallelism, which its
torch norms do not have), ``megatron_checks.py`` says what is checked."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from megatron_checks import (assert_rescaled, assert_resumed, assert_undone, make, resume,
                             torch_reads_megatron_015_metadata, transform)

torch_reads_megatron_015_metadata()

# case -> (megatron-core version, TP that saved it, optimizer, QK-norm, MoE experts, torchrun too)
CASES = {
    "adam-tp1": ("0.19.2", 1, "adam", False, None, False),          # fp32, FP32Optimizer; SRC = iter_N/
    "bf16-tp2": ("0.19.2", 2, "bf16", False, None, True),           # bf16 weights, fp32 masters (fp32_param)
    "distopt-dp2-qk-norm": ("0.19.2", 1, "dist-dp", True, None, False),  # DistributedOptimizer (param); qwen3
    "moe-bf16": ("0.19.2", 1, "bf16", False, "sequential", True),  # mixtral: experts stacked [L, E, ...]
    "mcore-0.15-bf16-tp2": ("0.15.3", 2, "bf16", False, None, False),  # MCoreMetadata and common.pt
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return {case: make(version, root / case, tp, optim, qk, moe)
            for case, (version, tp, optim, qk, moe, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_resumes_from_the_transformed_checkpoint(made, tmp_path, case):
    from wisca_cli import api

    version, _, optim, qk_norm, moe, ranks = CASES[case]
    folder = made[case]
    save, config = folder / "ckpt", folder / "config.json"
    src = save / "iter_0000003"
    out = tmp_path / "out"
    # SRC: Megatron-LM's save folder (the tracker names the iteration), or the iteration itself
    by_iter = case == "adam-tp1"
    report = transform(src if by_iter else save, out, config, ranks)
    assert report["name_adapter"] == "megatron" and report["verification"]["identical"]
    family = ("qwen3" if qk_norm else "llama") if not moe else "mixtral"
    assert report["architecture"] == family + "+megatron"
    for kind in ("vo", "ffn") + (() if qk_norm else ("qk",)):
        s = report["summary"][kind]
        assert s["units_changed"] and s["imbalance_after"] < s["imbalance_before"], kind
    out_iter = out if by_iter else out / "iter_0000003"
    if not by_iter:   # the tracker comes along; no other iteration
        assert (out / "latest_checkpointed_iteration.txt").read_text() == \
            (save / "latest_checkpointed_iteration.txt").read_text()
    counts = assert_rescaled(src, out_iter)
    acc = report["training_state"]["optimizer"]["accounting"]
    assert acc["exp_avg"]["scaled"] > 0 and acc["exp_avg_sq"]["scaled"] > 0
    masters = {"bf16": "fp32_param", "dist": "param", "dist-dp": "param"}.get(optim)
    if masters:
        assert acc[masters]["scaled"] > 0 and counts["masters"] == counts["weights"]
    # megatron's own files and objects as they were
    for name in ("metadata.json", "common.pt"):
        if (src / name).is_file():
            assert (out_iter / name).read_bytes() == (src / name).read_bytes()
    if version == "0.15.3":
        assert b"MCoreMetadata" in (out_iter / ".metadata").read_bytes()
    tps = (1,) if moe else (1, 2)   # MoE at TP 2 needs sequence parallelism, which megatron's torch norms lack
    for tp, result in resume(version, src, out_iter, tps, optim, qk_norm, moe, tmp_path / "resumed.pt").items():
        assert_resumed(result)
    assert_undone(src, out, tmp_path, "iter_0000003")
    assert api.verify(src, out_iter, config=config)["verification"]["identical"]
    assert api.inspect(out)["architecture"] == family + "+megatron"


def test_megatron_refusals_name_megatron(made, tmp_path):
    folder = made["adam-tp1"]
    src, config = folder / "ckpt" / "iter_0000003", folder / "config.json"

    def refused(path, match, cfg=config):
        res = run_cli("transform", path, tmp_path / "never", "--config", cfg)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr[-2000:]
        assert not (tmp_path / "never").exists()

    # a config of another depth: the stacked layer axis disagrees
    cfg = json.loads(config.read_text())
    (tmp_path / "deeper.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    refused(src, "a Megatron-core tensor of 3 stacked layers, but", tmp_path / "deeper.json")
    # a family the Megatron description does not name
    (tmp_path / "olmo2.json").write_text(json.dumps({**cfg, "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}))
    refused(src, "a Megatron-core checkpoint of a olmo2 model; wisca's Megatron description", tmp_path / "olmo2.json")
    # the DistributedOptimizer's default dp_reshardable buckets
    buckets = made["adam-tp1"].parent / "dp-reshardable"
    if not buckets.is_dir():
        make("0.19.2", buckets, 1, "dist-dp-buckets")
    refused(buckets / "ckpt", "Megatron's dp_reshardable optimizer buckets")
    # a tracker naming an iteration that is not there
    bad = tmp_path / "save"
    shutil.copytree(folder / "ckpt", bad)
    (bad / "latest_checkpointed_iteration.txt").write_text("7")
    refused(bad, "names iteration 7")
    # a zarr checkpoint
    zarr = tmp_path / "zarr"
    shutil.copytree(src, zarr)
    (zarr / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    refused(zarr, "Megatron-core checkpoint in the 'zarr' format")
