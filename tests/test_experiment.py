"""Smoke runs of experiments/transition.py: a few steps, one seed, a smaller model.

The experiment's premise is that the original and the transitioned branch start from the
same function and see the same batches; these runs check it: with power-of-two scales the
validation loss at the boundary is bit-identical, and a transition with strength 0 (every
scale 1) reproduces the baseline's curve exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("transition", REPO / "experiments" / "transition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outputs(out: Path) -> dict:
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for row in run["table"]:
        assert f"| {row['branch']} |" in md
    return run


def test_smoke_pretrain_transition_starts_from_the_same_function(experiment, tmp_path):
    run = experiment.main(["--smoke", "--out", str(tmp_path), "--transition-at", "early,late",
                           "--optimizer-state", "transform,reset", "--random-control"])
    check_outputs(tmp_path)
    seed = run["seeds"][0]
    assert set(seed["branches"]) == {"baseline", "wisca@4", "random@4", "wisca@4/reset", "reset@4",
                                     "wisca@12", "random@12", "wisca@12/reset", "reset@12"}
    assert set(seed["transitions"]) == {"wisca@4", "random@4", "wisca@4/reset",
                                        "wisca@12", "random@12", "wisca@12/reset"}
    for name, info in seed["transitions"].items():
        b = seed["branches"][name]["transition"]
        baseline_at_b = seed["branches"]["baseline"]["curve"][b]
        assert info["boundary_val_original"] == baseline_at_b
        assert info["boundary_val_transitioned"] == baseline_at_b, name  # bit-identical (pow2)
        assert info["boundary_bit_identical"] is True
        assert info.get("verification_passed", True) is True   # random@ is not a wisca.transform
        assert set(info["imbalance"]) == {"qk", "vo", "ffn"}
    # every branch trains to the same final step, and the table covers all of them
    assert [r["branch"] for r in run["table"]] == list(seed["branches"])
    for branch in seed["branches"].values():
        assert max(branch["curve"]) == run["total_steps"] == 16


def test_smoke_strength_zero_reproduces_the_baseline_exactly(experiment, tmp_path):
    """Scales of 1: save, transform, reload and the carried optimizer state change nothing."""
    run = experiment.main(["--smoke", "--out", str(tmp_path), "--transition-at", "5", "--strength", "0",
                           "--eval-every", "2"])
    seed = run["seeds"][0]
    base, wisca = seed["branches"]["baseline"], seed["branches"]["wisca@5"]
    assert seed["transitions"]["wisca@5"]["units_changed"] == 0.0
    assert {t: v for t, v in base["curve"].items() if t >= 5} == wisca["curve"]
    assert {t: v for t, v in base["train_loss"].items() if t >= 5} == wisca["train_loss"]


def test_smoke_lora_transition_starts_from_the_same_function(experiment, tmp_path):
    run = experiment.main(["--smoke", "--lora", "--out", str(tmp_path), "--transition-at", "early"])
    check_outputs(tmp_path)
    seed = run["seeds"][0]
    info = seed["transitions"]["wisca@3"]
    assert info["boundary_val_transitioned"] == seed["branches"]["baseline"]["curve"][3]
    assert info["boundary_bit_identical"] is True
    imb = info["imbalance"]["lora"]
    assert imb["after"] < imb["before"]   # B starts at zero: the adapter is far from balanced
    assert run["lora_base"]["steps"] == 16
