"""OLMo-core 3.0.0, tested against itself: `stepN/` folders written by OLMo-core's own
`Trainer.fit` (TransformerConfig llama-like and OLMo-2 ``reordered_norm`` blocks,
TransformerTrainModuleConfig with FSDP on 2 ranks, AdamWConfig, CheckpointerCallback), unbalanced
at a fixed function by exact powers of two (``tests/frameworks/olmo_core/make_ckpt.py``). wisca
transforms ``stepN/`` (``model_and_optim/`` rewritten, ``train/`` and ``.metadata.json`` copied,
OLMo-core's own storage-info class read and written back); OLMo-core's
`load_model_and_optim_state` reads the output at world size 1 and 2, its forward gives
bit-identical logits, and its Trainer trains on. OLMo-core runs in an environment of its own,
built once and cached (``framework_checks.framework_python``): it pins huggingface_hub < 2 and
rich < 14, which transformers 5.25 in the test environment does not accept; wisca itself reads
and writes OLMo-core's storage-info class without OLMo-core installed.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from framework_checks import (FRAMEWORKS, as_step, assert_loaded_exactly, assert_rescaled, assert_undone,
                              framework_python, load_back, torch_reads_olmo_core_metadata, torchrun,
                              transform_both_ways)

torch_reads_olmo_core_metadata()
SCRIPTS = FRAMEWORKS / "olmo_core"
FLAVORS = {"llama": "llama+olmo_core", "olmo2": "olmo2+olmo_core"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo_core")
    python = framework_python("olmo_core")       # its own environment: its pins disagree with transformers'
    out = {}
    for flavor in FLAVORS:
        torchrun(2, SCRIPTS / "make_ckpt.py", "--flavor", flavor, "--out", root / flavor, python=python)
        out[flavor] = root / flavor
    return out


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_olmo_core_resumes_from_the_transformed_checkpoint(made, tmp_path, flavor):
    folder = made[flavor]
    src, config, probe = folder / "ckpt" / "step3", folder / "config.json", folder / "probe.pt"
    out = tmp_path / "out"
    report = transform_both_ways(src, out, config)
    assert report["architecture"] == FLAVORS[flavor] and report["name_adapter"] == "olmo_core"
    assert report["verification"]["identical"]
    assert report["summary"]["vo"]["units_changed"] and report["summary"]["ffn"]["units_changed"]
    for kind, s in report["summary"].items():
        if s["units_changed"]:
            assert s["imbalance_after"] < s["imbalance_before"], kind
    checked = assert_rescaled(src, out, "model.", "optim.")
    acc = report["training_state"]["optimizer"]["accounting"]
    assert acc["exp_avg"]["scaled"] == checked["exp_avg_scaled"] > 0
    # the step's other files, and OLMo-core's own storage-info class in the new metadata
    assert (out / ".metadata.json").read_bytes() == (src / ".metadata.json").read_bytes()
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(p.name for p in (src / "train").iterdir())
    assert b"olmo_core.distributed.checkpoint.filesystem" in (out / "model_and_optim" / ".metadata").read_bytes()
    step = as_step(out, tmp_path, "step3")
    for world in (1, 2):
        assert_loaded_exactly(load_back("olmo_core", flavor, step, probe, tmp_path, world), probe)
    assert_undone(src, out, tmp_path)
    assert run_cli("verify", src, out, "--config", config).returncode == 0
    res = run_cli("inspect", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["architecture"] == FLAVORS[flavor], res.stderr
    res = run_cli("transform", src, tmp_path / "dropped", "--config", config, "--training-state", "drop", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["training_state"]["optimizer"]["dropped"]
