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
import torch

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


def test_smoke_gpu_preset_arms_start_from_the_same_function_and_the_control_is_a_control(experiment, tmp_path):
    """The GPU preset's own code path (corpus, arms, SDPA, bf16 autocast, paired intervals) at smoke
    size on the CPU: the command a GPU runs, with --smoke --device cpu."""
    from safetensors.torch import load_file

    run = experiment.main(["--preset", "gpu-50m", "--smoke", "--device", "cpu", "--precision", "bf16",
                           "--out", str(tmp_path), "--keep-checkpoints"])
    check_outputs(tmp_path)
    assert run["complete"] is True and json.loads((tmp_path / "results.json").read_text())["complete"] is True
    settings = run["settings"]
    assert (settings["preset"], settings["corpus"], settings["attn"], settings["random_control"]) == \
        ("gpu-50m", "stdlib", "sdpa", True)
    assert run["device"]["device"] == "cpu" and run["device"]["precision"] == "bf16"
    # the preset's data: the whole stdlib, more than the top-level modules of the CPU study
    top_train, _ = experiment.load_corpus(None)
    assert run["data_bytes"]["train"] > len(top_train)
    # the parameter count the docs quote is the model's own; the preset itself is ~50M
    assert run["model"]["parameters"] == run["model"]["parameters_from_shapes"]
    preset = experiment.parse_args(["--preset", "gpu-50m", "--estimate"])
    assert experiment.count_parameters(preset) == 49_951_488
    assert (preset.heads, preset.kv_heads, preset.seeds) == (12, 3, 3)

    assert len(run["seeds"]) == 2
    b = run["boundaries"][0]
    assert b == run["total_steps"] // 2
    for seed in run["seeds"]:
        assert set(seed["branches"]) == {"baseline", f"wisca@{b}", f"random@{b}"}
        base_at_b = seed["branches"]["baseline"]["curve"][b]
        # every arm starts from the same function: fp32 validation bit-identical at the boundary
        for name in (f"wisca@{b}", f"random@{b}"):
            info = seed["transitions"][name]
            assert info["boundary_val_transitioned"] == base_at_b, name
            assert info["boundary_bit_identical"] is True
            assert seed["branches"][name]["curve"][b] == base_at_b
        assert seed["transitions"][f"wisca@{b}"]["verification_passed"] is True
        assert seed["transitions"][f"wisca@{b}"]["units_changed"] > 0     # not a no-op
        # the control is a control: per pair and layer a permutation of wisca's own scales, not wisca's
        folder = tmp_path / "checkpoints" / f"seed{seed['seed']}"
        real = load_file(str(folder / f"step{b}-wisca@{b}" / "wisca_scales.safetensors"))
        control = load_file(str(folder / f"step{b}-random@{b}" / "wisca_scales.safetensors"))
        assert set(real) == set(control)
        for k in real:
            assert torch.equal(real[k].sort().values, control[k].sort().values), k
        assert any(not torch.equal(real[k], control[k]) for k in real)
        assert seed["transitions"][f"random@{b}"]["units_moved"] > 0
        # and the control's weights are not wisca's: the same function, another parametrisation
        w_real = load_file(str(folder / f"step{b}-wisca@{b}" / "model.safetensors"))
        w_control = load_file(str(folder / f"step{b}-random@{b}" / "model.safetensors"))
        assert any(not torch.equal(w_real[k], w_control[k]) for k in w_real)
    # paired differences with intervals: each arm vs the baseline, and wisca vs its control
    paired = {(r["arm"], r["reference"]): r for r in run["paired"]}
    assert set(paired) == {(f"wisca@{b}", "baseline"), (f"random@{b}", "baseline"), (f"wisca@{b}", f"random@{b}")}
    for r in paired.values():
        ci = r["ci95"]
        assert ci["n"] == 2 and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert "95 % t-interval" in (tmp_path / "results.md").read_text()
    assert run["measured_throughput"]["train_steps"] == 2 * (16 + 8 + 8)
