"""Smoke runs of experiments/controls.py and experiments/rebalance.py: tiny sizes, seconds.

What they check is the experiments' premise, not their results: every arm starts from the
same function (bit-identical logits where the rescaling is by powers of two; the product
B A to rounding for the continuous LoRA transforms), and each control is really a control
(the same multiset of scales, or the same spectrum, put on other units or directions).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def controls():
    return _load("controls")


def _outputs(out: Path, png: str) -> dict:
    for name in ("results.json", "results.md", png):
        assert (out / name).stat().st_size > 0, name
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "results.json").read_text())


def test_controls_smoke_every_arm_starts_from_the_same_function(controls, tmp_path):
    run = controls.main(["--smoke", "--out", str(tmp_path)])
    saved = _outputs(tmp_path, "controls.png")
    assert saved["mlp"]["table"].keys() == set(controls.MLP_ARMS)
    check = run["mlp"]["start_check"]
    for arm in controls.MLP_ARMS:
        if arm == "every":            # continuous ENorm: equal to rounding, not bit for bit
            assert check[arm]["max_abs_diff"] < 1e-4
        else:                         # powers of two: the same logits, bit for bit
            assert check[arm]["bit_identical"] is True, arm
    assert check["once"]["imbalance"] < check["never"]["imbalance"]
    for arm, c in run["lora"]["start_check"].items():
        assert c["max_rel_product_diff"] < 1e-12, arm
    # the balancing arms balance; the controls do not
    assert run["lora"]["start_check"]["gl-once"]["balance_residual"] < 1e-10
    assert run["lora"]["start_check"]["gl-once-control"]["balance_residual"] > 1e-3
    for opt in ("gd", "adam"):
        res = run["lora"][opt]
        assert set(res["table"]) == set(controls.LORA_ARMS)
        assert "gl-every - gl-every-control" in res["comparisons"]
        for row in res["table"].values():
            assert row["best_lr"] in run["lora"]["config"]["lrs"][opt]


def test_mlp_shuffled_control_is_the_same_scales_on_other_neurons(controls):
    cfg = dict(controls.CONFIGS["smoke"]["mlp"])
    data, base, unbalanced = controls.mlp_setup(cfg)
    _, once = controls.mlp_start("once", base, unbalanced, cfg["seeds"])
    _, ctrl = controls.mlp_start("shuffled-once", base, unbalanced, cfg["seeds"])
    moved = 0
    for d, c in zip(once, ctrl):
        for row_d, row_c in zip(d, c):
            assert torch.equal(row_d.sort().values, row_c.sort().values)   # the same multiset per layer
            moved += int((row_d != row_c).sum())
    assert moved > 0                                                      # on other neurons
    # the every-step control permutes each sweep's scales the same way
    net = controls.clone(unbalanced)
    probe = controls.clone(unbalanced)
    real = controls.enorm_sweep_(probe, pow2=True)
    shuf = controls.enorm_sweep_(net, pow2=True, perm_gen=torch.Generator().manual_seed(0))
    assert torch.equal(real[0].sort(dim=1).values, shuf[0].sort(dim=1).values)
    assert not torch.equal(real[0], shuf[0])


def test_lora_controls_are_the_same_scales_or_spectrum_elsewhere(controls):
    cfg = dict(controls.CONFIGS["smoke"]["lora"])
    prob = controls.lora_problem(cfg)
    A, B = prob["A"], prob["B"]
    s = controls.diag_scales(A, B)
    g = torch.Generator().manual_seed(0)
    A2, B2 = controls.lora_transform("diag-shuffled", A, B, None, g)
    s_shuf = (A2.norm(dim=2) / A.norm(dim=2))
    assert torch.allclose(s.sort(dim=1).values, s_shuf.sort(dim=1).values, rtol=1e-12)
    assert not torch.allclose(s, s_shuf)
    M, _ = controls.gl_balance(A, B)
    A3, B3 = controls.lora_transform("gl-control", A, B, None, torch.Generator().manual_seed(0))
    Mc = A3 @ torch.linalg.pinv(A)                        # the control's M, recovered
    assert torch.allclose(torch.linalg.eigvalsh(0.5 * (Mc + Mc.transpose(1, 2))), torch.linalg.eigvalsh(M),
                          rtol=1e-8)
    assert not torch.allclose(Mc, M, atol=1e-3)
    assert torch.allclose(B3 @ A3, B @ A, rtol=0, atol=1e-12)


def test_rebalance_smoke_arms_start_from_the_same_function_and_the_control_is_one(tmp_path):
    pytest.importorskip("transformers")
    reb = _load("rebalance")
    run = reb.main(["--smoke", "--out", str(tmp_path)])
    _outputs(tmp_path, "rebalance.png")
    for key, c in run["start_check"].items():
        assert c["bit_identical"] is True, key       # induced imbalance and transitions: pow2
        if c["control_scales"] is not None:
            for before, after, _, moved in c["control_scales"].values():
                assert before == after                # the same multiset of scales
                assert moved > 0                      # ... put on other units
    # the natural model's scales differ from unit to unit, so there the control is another pattern
    ctrl = run["start_check"]["natural/shuffled-once"]["control_scales"]
    assert any(not same for _, _, same, _ in ctrl.values()) or all(len(set(b)) == 1 for b, *_ in ctrl.values())
    assert run["start_check"]["induced/none"]["imbalance"]["qk"] > run["start_check"]["natural/none"]["imbalance"]["qk"] + 2
    assert run["start_check"]["induced/once"]["imbalance"]["qk"] < run["start_check"]["induced/none"]["imbalance"]["qk"]
    for cell, by_arm in run["runs"].items():
        assert set(by_arm) == set(reb.ARMS)
        for arm, by_lr in by_arm.items():
            for runs in by_lr.values():
                for r in runs:
                    assert max(r["curve"]) == run["config"]["steps"]
                    assert all(t.get("verification", True) for t in r["transitions"])
