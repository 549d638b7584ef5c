"""DeepSpeed ZeRO checkpoints, written and resumed by DeepSpeed itself through transformers' Trainer.

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

import pytest
import torch

import wisca_cli as wisca
from conftest import run_cli
from framework_checks import ENV, FRAMEWORKS, torchrun

import deepspeed  # noqa: F401  - a test dependency: the format is checked against DeepSpeed itself

HARNESS = FRAMEWORKS / "deepspeed" / "ds_trainer.py"
DS_ENV = {**ENV, "DS_ACCELERATOR": "cpu"}

CASES = {   # name -> (ranks, harness flags); ZeRO 2 fp32 at one rank is the refusal tests' checkpoint
    "zero2-bf16": (1, ["--stage", "2", "--bf16"]),
    # Trainer's AdamW (two param groups); a parameter count that leaves the last rank's partition padded
    "zero1-2ranks-trainer-optimizer-padded": (2, ["--stage", "1", "--trainer-optim", "--odd"]),
    "zero2-2ranks": (2, ["--stage", "2"]),
    "zero3-2ranks-bf16": (2, ["--stage", "3", "--bf16"]),
    # no model.safetensors: the weights are the engine's fp32 masters only; a Mixtral, whose experts
    # DeepSpeed holds fused as transformers 5 does in memory ([E, 2I, H], [E, H, I])
    "zero3-2ranks-no-gather-moe": (2, ["--stage", "3", "--no-gather", "--moe"]),
    # ds_to_universal's output beside the checkpoint; the resume loads it (load_universal)
    "zero2-universal": (1, ["--stage", "2", "--universal"]),
    "zero3-2ranks-universal": (2, ["--stage", "3", "--universal"]),
}


def harness(ranks: int, *args) -> None:
    if ranks > 1:
        torchrun(ranks, HARNESS, *args, python=sys.executable)
        return
    res = subprocess.run([sys.executable, str(HARNESS), *map(str, args)], capture_output=True, text=True,
                         timeout=420, env={**os.environ, **DS_ENV})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(source checkpoint-3/, transformed output, the transform's JSON report, ranks, flags)."""
    ranks, flags = CASES[request.param]
    os.environ.update(DS_ENV)
    tmp = tmp_path_factory.mktemp(request.param)
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


# -- what wisca refuses: exit 2, one line naming the file, nothing written -----------------------
@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    os.environ.update(DS_ENV)
    tmp = tmp_path_factory.mktemp("zero2-refusals")
    harness(1, "make", tmp / "run", "--stage", "2")
    return tmp / "run" / "checkpoint-3"


def refused(src: Path, tmp: Path, match: str) -> None:
    before = files(src)
    dst = tmp / "never"
    res = run_cli("transform", src, dst)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not dst.exists() and files(src) == before


def variant(zero2: Path, tmp: Path, edit) -> Path:
    import shutil

    src = tmp / "src"
    shutil.copytree(zero2, src)
    edit(src / "global_step3")
    return src


def _edit_optim(fn):
    def edit(folder: Path) -> None:
        path = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        sd = torch.load(path, weights_only=False)   # the test's own file: DeepSpeed's classes
        fn(sd["optimizer_state_dict"])
        torch.save(sd, path)
    return edit


def _shift_first_slice(osd) -> None:
    from deepspeed.utils.tensor_fragment import fragment_address

    name, addr = next(iter(osd["param_slice_mappings"][0].items()))
    osd["param_slice_mappings"][0][name] = fragment_address(numel=addr.numel, start=addr.start + 1)


def _unknown_moment(osd) -> None:
    osd["base_optimizer_state"]["state"][0]["exp_avg_sq_row"] = torch.zeros(3)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


@pytest.mark.parametrize("how, match", [
    ("slices", "param_slice_mappings disagree with the layout"),
    ("moment", "optimizer state keys ['exp_avg_sq_row'] are not Adam's"),
    ("tensor-parallel", "tensor (model) parallel ranks"),
    ("code", "refused to unpickle posix.system"),
    ("stale-tag", "a DeepSpeed checkpoint beside the one `latest` names"),
    ("pipeline", "a DeepSpeed state file of a layout wisca does not know (pipeline or tensor parallel?)"),
    ("latest", "names 'global_step9', which is not a folder here"),
])
def test_a_state_wisca_cannot_map_is_refused(zero2, tmp_path, how, match):
    import shutil

    edits = {
        "slices": _edit_optim(_shift_first_slice),
        "moment": _edit_optim(_unknown_moment),
        "tensor-parallel": lambda f: shutil.copy(f / "mp_rank_00_model_states.pt", f / "mp_rank_01_model_states.pt"),
        "code": lambda f: torch.save({"x": _RunsCode()}, f / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        "stale-tag": lambda f: shutil.copytree(f, f.parent / "global_step1"),
        "pipeline": lambda f: shutil.copy(f / "mp_rank_00_model_states.pt", f / "layer_01-model_states.pt"),
        "latest": lambda f: (f.parent / "latest").write_text("global_step9"),
    }
    src = variant(zero2, tmp_path, edits[how])
    refused(src, tmp_path, match)
    assert not (Path.cwd() / "ran-code").exists() and not (src / "ran-code").exists()


def test_drop_writes_the_weights_without_the_engine_state(zero2, tmp_path):
    out = tmp_path / "out"
    res = run_cli("transform", zero2, out, "--training-state", "drop", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(json.loads(res.stdout)["training_state"]["optimizer"]["dropped"]) == ["global_step3", "latest"]
    assert not (out / "global_step3").exists() and (out / "model.safetensors").is_file()


def test_verify_and_inspect_take_a_folder_whose_weights_are_the_engines(case):
    src, out, report, _, flags = case
    if "--no-gather" not in flags:
        return
    assert not (src / "model.safetensors").exists() and report["weights_from_engine"]
    res = run_cli("verify", src, out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["verification"]["passed"], res.stderr[-2000:]
    res = run_cli("inspect", src, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["source"] == str(src.resolve()), res.stderr[-2000:]


def test_a_bare_deepspeed_folder_takes_the_models_config(zero2, tmp_path):
    """``engine.save_checkpoint``'s own folder: ``latest`` and ``global_stepN/`` only."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copytree(zero2 / "global_step3", bare / "global_step3")
    shutil.copy(zero2 / "latest", bare / "latest")
    refused(bare, tmp_path, "a DeepSpeed checkpoint without config.json; pass the model's config.json (--config)")
    out = tmp_path / "out"
    res = run_cli("transform", bare, out, "--config", zero2 / "config.json", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["weights_from_engine"]["added"] == ["config.json", "model.safetensors"]
    assert report["verification"]["passed"] and report["training_state"]["optimizer"]["scaled_parameters"] > 0
    back = tmp_path / "back"
    assert run_cli("undo", out, back).returncode == 0
    assert files(back) == files(bare)
