"""DeepSpeed ZeRO 1 and 2 (one rank and two) and ZeRO 2's universal form, resumed by DeepSpeed itself through
transformers' Trainer (``deepspeed_checks``: the harness and the tests every case runs), and
what wisca refuses in a DeepSpeed folder: exit 2, one line naming the file, nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import deepspeed  # noqa: F401  - a test dependency: the format is checked against DeepSpeed itself
import wisca_cli as wisca
from conftest import run_cli
from deepspeed_checks import (DS_ENV, files, harness, make_case, test_deepspeed_resumes_the_transformed_state,  # noqa: F401
                              test_transform_reports_the_engine_state, test_undo_gives_every_file_back,
                              test_verify_and_inspect_take_the_folder)

CASES = {   # name -> (ranks, harness flags); ZeRO 2 fp32 at one rank is the refusal tests' checkpoint
    "zero1": (1, ["--stage", "1"]),
    "zero2-bf16": (1, ["--stage", "2", "--bf16"]),
    # Trainer's AdamW (two param groups); a parameter count that leaves the last rank's partition padded
    "zero1-2ranks-trainer-optimizer-padded": (2, ["--stage", "1", "--trainer-optim", "--odd"]),
    "zero2-2ranks": (2, ["--stage", "2"]),
    # ds_to_universal's output beside the checkpoint; the resume loads it (load_universal)
    "zero2-universal": (1, ["--stage", "2", "--universal"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return make_case(request.param, *CASES[request.param], tmp_path_factory)


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
    ("truncated", "zero_pp_rank_0_mp_rank_00_optim_states.pt: not a torch.save zip archive"),
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
        "truncated": lambda f: os.truncate(f / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           (f / "zero_pp_rank_0_mp_rank_00_optim_states.pt").stat().st_size // 2),
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


def test_continuous_scales_round_each_entry_once(zero2, tmp_path):
    """``--scales continuous``: every master, moment and module weight is the float64 product
    rounded once to its dtype (``balance.apply_multiplier``), checked per parameter against the
    source's flat partitions; the record says the state is not exact."""
    from wisca_cli.balance import apply_multiplier

    out = tmp_path / "out"
    res = run_cli("transform", zero2, out, "--scales", "continuous", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    opt = json.loads(res.stdout)["training_state"]["optimizer"]
    assert opt["scaled_parameters"] > 0 and not opt["exact"]
    mults = wisca.scale_multipliers(out)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    a = torch.load(zero2 / "global_step3" / name, weights_only=False)["optimizer_state_dict"]
    b = torch.load(out / "global_step3" / name, weights_only=False)["optimizer_state_dict"]
    model_a = torch.load(zero2 / "global_step3" / "mp_rank_00_model_states.pt", weights_only=False)
    model_b = torch.load(out / "global_step3" / "mp_rank_00_model_states.pt", weights_only=False)
    shapes = model_a["param_shapes"][0]
    checked = 0
    for pname, addr in a["param_slice_mappings"][0].items():
        s = mults.get(pname)
        if s is None:
            continue
        shape, cut = shapes[pname], slice(addr.start, addr.start + addr.numel)
        flats = [("fp32", a["single_partition_of_fp32_groups"][0], b["single_partition_of_fp32_groups"][0], 1)]
        flats += [(k, a["base_optimizer_state"]["state"][0][k], b["base_optimizer_state"]["state"][0][k], -p)
                  for k, p in (("exp_avg", 1), ("exp_avg_sq", 2))]
        for key, x, y, power in flats:
            want = apply_multiplier(x[cut].view(shape), s, power)
            assert torch.equal(y[cut].view(shape), want), f"{key} of {pname}"
        w = apply_multiplier(model_a["module"][pname], s, 1)
        assert torch.equal(model_b["module"][pname], w), f"weights of {pname}"
        checked += 1
    assert checked == opt["scaled_parameters"]
