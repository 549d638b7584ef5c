"""DeepSpeed ZeRO checkpoints written and resumed by DeepSpeed itself through transformers'
Trainer: the harness, the checks, and the tests every case runs. The cases are split over
``test_framework_deepspeed.py`` and ``test_framework_deepspeed_zero3.py`` (each defines
``CASES`` and the ``case`` fixture through ``make_case``), so the two pytest-xdist workers
share them; the tests below are collected in each file that imports them.

Each case trains a tiny GQA llama (skewed by exact powers of two at a fixed function) for
three steps with ``tests/frameworks/deepspeed/ds_trainer.py`` on CPU (``DS_ACCELERATOR=cpu``,
gloo), one rank or two under torchrun, and saves ``checkpoint-3/`` (``model.safetensors``,
``latest``, ``global_step3/``). ``wisca transform`` (defaults) must exit 0; then the same
Trainer resumes from the source and from the output and records, before its first step,
what DeepSpeed restored, with DeepSpeed's own accessors (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``, the gathered working weights). Against the scales wisca
recorded: weights and masters ``* S``, ``exp_avg / S``, ``exp_avg_sq / S**2``, bit for bit;
the logits of both resumed models bit-identical; two more steps with finite losses; and
``wisca undo`` gives every file of the source back byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import wisca_cli as wisca
from conftest import run_cli
from framework_checks import ENV, FRAMEWORKS, torchrun

HARNESS = FRAMEWORKS / "deepspeed" / "ds_trainer.py"
DS_ENV = {**ENV, "DS_ACCELERATOR": "cpu"}


def harness(ranks: int, *args) -> None:
    if ranks > 1:
        torchrun(ranks, HARNESS, *args, python=sys.executable)
        return
    res = subprocess.run([sys.executable, str(HARNESS), *map(str, args)], capture_output=True, text=True,
                         timeout=420, env={**os.environ, **DS_ENV})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_case(name: str, ranks: int, flags: list[str], tmp_path_factory):
    """(source checkpoint-3/, transformed output, the transform's JSON report, ranks, flags)."""
    os.environ.update(DS_ENV)
    tmp = tmp_path_factory.mktemp(name)
    harness(ranks, "make", tmp / "run", *flags)
    src = tmp / "run" / "checkpoint-3"
    out = tmp / "out"
    res = run_cli("transform", src, out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return src, out, json.loads(res.stdout), ranks, flags


def test_transform_reports_the_engine_state(case):
    src, out, report, ranks, flags = case
    opt = report["training_state"]["optimizer"]
    stage = int(flags[flags.index("--stage") + 1])
    assert opt["format"] == f"deepspeed-zero{stage}" and opt["world_size"] == ranks and opt["exact"]
    assert opt["scaled_parameters"] > 0 and opt["underflow"] == 0
    acc = opt["accounting"]
    assert acc["exp_avg"]["scaled"] > 0 and acc["exp_avg_sq"]["scaled"] > 0 and acc["fp32"]["scaled"] > 0
    assert acc["step"]["copied"] > 0 and ("weights" in acc) == (stage < 3)
    before, after = files(src / "global_step3"), files(out / "global_step3")
    assert sorted(before) == sorted(after)
    assert all(before[n] != after[n] for n in before if "optim_states" in n)   # every rank's file rescaled
    assert (out / "latest").read_text() == (src / "latest").read_text()


def universal_only(folder: Path, tmp: Path) -> Path:
    """A copy without the regular tag folder: a resume can only load the universal one."""
    import shutil

    copy = tmp / folder.name
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "global_step3")
    (copy / "latest").unlink()
    return copy


def test_deepspeed_resumes_the_transformed_state(case, tmp_path):
    src, out, report, ranks, flags = case
    if "--universal" in flags:
        assert report["training_state"]["universal"]["format"] == "deepspeed-universal"
        src, out = universal_only(src, tmp_path / "a"), universal_only(out, tmp_path / "b")
    harness(ranks, "resume", src, tmp_path / "src.pt", *flags)
    harness(ranks, "resume", out, tmp_path / "out.pt", *flags)
    a, b = torch.load(tmp_path / "src.pt"), torch.load(tmp_path / "out.pt")
    assert torch.equal(a["logits"], b["logits"])
    assert len(b["losses"]) == 2 and all(torch.isfinite(torch.tensor(b["losses"])))
    if "--moe" in flags:
        assert_follows_the_weights(a, b, out, report)
        return
    mults = wisca.scale_multipliers(out)
    scaled = 0
    for name in a["weight"]:
        s = mults.get(name, torch.ones(()))
        scaled += not bool((s == 1).all())
        for key, power in (("weight", 1), ("master", 1), ("exp_avg", -1), ("exp_avg_sq", -2)):
            x, y = a[key][name], b[key][name]
            want = (x.double() * s.double() ** power).to(x.dtype)
            assert torch.equal(y, want), f"{key} of {name}"
            r = (y.double() / x.double())[x != 0]
            assert bool((torch.frexp(r)[0].abs() == 0.5).all()), f"{key} of {name}: not a power of two"
    assert scaled == report["training_state"]["optimizer"]["scaled_parameters"]


def assert_follows_the_weights(a: dict, b: dict, out: Path, report: dict) -> None:
    """For parameters that are not one checkpoint tensor (fused experts): the resumed weights
    are those transformers loads from the output, each changed by a power of two r (from the
    masters), and the moments by 1/r and 1/r**2, bit for bit."""
    from transformers import AutoModelForCausalLM

    loaded = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    scaled = 0
    for name in a["weight"]:
        ma, mb = a["master"][name].double(), b["master"][name].double()
        r = torch.where(ma != 0, mb / ma, torch.ones_like(ma))
        assert bool((torch.frexp(r)[0].abs() == 0.5).all()), f"{name}: not a power of two"
        scaled += not bool((r == 1).all())
        w = b["weight"][name]
        assert torch.equal(w, loaded[name].detach().to(w.dtype)), f"weight of {name}"
        assert torch.equal((a["weight"][name].double() * r).to(w.dtype), w), f"weight of {name}"
        for key, power in (("exp_avg", -1), ("exp_avg_sq", -2)):
            assert torch.equal((a[key][name].double() * r ** power).to(b[key][name].dtype), b[key][name]), \
                f"{key} of {name}"
    assert scaled == report["training_state"]["optimizer"]["scaled_parameters"] > 0


def test_undo_gives_every_file_back(case, tmp_path):
    src, out, _, _, _ = case
    back = tmp_path / "back"
    res = run_cli("undo", out, back, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["training_state"]["optimizer"]["direction"] == "S (undo)"
    want, got = files(src), files(back)
    assert sorted(got) == sorted(want)
    assert [n for n in want if want[n] != got[n]] == []


def test_verify_and_inspect_take_the_folder(case):
    """``verify SRC OUT`` passes bit for bit and ``inspect`` reads the source, also where the
    only weights are the engine's (then the report says model.safetensors was added)."""
    src, out, report, _, flags = case
    weightless = "--no-gather" in flags
    assert (src / "model.safetensors").exists() != weightless
    assert ("weights_from_engine" in report) == weightless
    res = run_cli("verify", src, out, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    verification = json.loads(res.stdout)["verification"]
    assert verification["passed"] and verification["identical"]
    res = run_cli("inspect", src, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["source"] == str(src.resolve()), res.stderr[-2000:]
