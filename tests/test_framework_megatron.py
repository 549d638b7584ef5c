"""Megatron-core, tested against itself: torch_dist checkpoints written by megatron-core 0.19.2
and 0.15.3 (``GPTModel`` with the local layer spec, ``get_megatron_optimizer``, a few training
steps, ``dist_checkpointing.save`` as Megatron-LM calls it, the tracker file beside ``iter_N/``;
``tests/frameworks/megatron/mc_harness.py``, with its few CPU shims named there), unbalanced at
a fixed function by exact powers of two. wisca transforms them without megatron installed and
megatron-core's own ``dist_checkpointing.load`` reads the output into fresh models and
optimizers at TP 1 and TP 2 (``megatron_checks.py`` says what is checked)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from megatron_checks import (assert_rescaled, assert_resumed, assert_undone, make, resume,
                             torch_reads_megatron_015_metadata, transform_both_ways)

torch_reads_megatron_015_metadata()

# case -> (megatron-core version, TP that saved it, optimizer, QK-norm)
CASES = {
    "adam-tp1": ("0.19.2", 1, "adam", False),            # fp32, FP32Optimizer
    "bf16-tp2": ("0.19.2", 2, "bf16", False),            # bf16 weights, fp32 masters (fp32_param)
    "distopt-dp2": ("0.19.2", 1, "dist-dp", False),      # DistributedOptimizer over 2 DP ranks (param)
    "distopt-tp2": ("0.19.2", 2, "dist", False),
    "qk-norm-tp1": ("0.19.2", 1, "adam", True),          # Qwen 3's q/k layernorms
    "mcore-0.15-bf16-tp2": ("0.15.3", 2, "bf16", False),  # MCoreMetadata and common.pt
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return {case: make(version, root / case, tp, optim, qk) for case, (version, tp, optim, qk) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_resumes_from_the_transformed_checkpoint(made, tmp_path, case):
    version, _, optim, qk_norm = CASES[case]
    folder = made[case]
    save, config = folder / "ckpt", folder / "config.json"
    src = save / "iter_0000003"
    out = tmp_path / "out"
    # SRC: Megatron-LM's save folder (the tracker names the iteration), or the iteration itself
    report = transform_both_ways(save if case != "adam-tp1" else src, out, config)
    assert report["name_adapter"] == "megatron" and report["verification"]["identical"]
    assert report["architecture"] == ("qwen3" if qk_norm else "llama") + "+megatron"
    for kind in ("vo", "ffn") + (() if qk_norm else ("qk",)):
        s = report["summary"][kind]
        assert s["units_changed"] and s["imbalance_after"] < s["imbalance_before"], kind
    out_iter = out if case == "adam-tp1" else out / "iter_0000003"
    if case != "adam-tp1":   # the tracker comes along; no other iteration
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
    for tp in (1, 2):
        assert_resumed(resume(version, src, out_iter, tp, optim, qk_norm, tmp_path / f"resumed-tp{tp}.pt"))
    assert_undone(src, out, tmp_path, "iter_0000003")
    assert run_cli("verify", src, out_iter, "--config", config).returncode == 0
    res = run_cli("inspect", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["architecture"].endswith("+megatron"), res.stderr


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
    buckets = made["distopt-dp2"].parent / "dp-reshardable"
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
