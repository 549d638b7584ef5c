"""Reading torch.distributed checkpoints back in tests: every entry flattened, the
multipliers a transform applied (from its record), and the check that an output is its
source rescaled, moments and all, bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from conftest import run_cli
from wisca_cli import solve
from wisca_cli.dcp import MOMENT_POWERS, open_dcp
from wisca_cli.record import layer_scales, read_record


def entries(folder: Path) -> dict:
    """Every entry of a DCP checkpoint (its folders for the Trainer layout), flattened keys."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out = {}
    subs = [folder / "pytorch_model_fsdp_0", folder / "optimizer_0"] if (folder / "pytorch_model_fsdp_0").is_dir() \
        else [folder]
    for sub in subs:
        sd: dict = {}
        _load_state_dict(sd, storage_reader=dcp.FileSystemReader(sub), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        md = dcp.FileSystemReader(sub).read_metadata()
        for key, path in md.planner_data.items():
            value = sd
            for p in path:
                value = value[p]
            out[key] = value
    return out


def metadata(folder: Path):
    subs = [folder / "pytorch_model_fsdp_0", folder / "optimizer_0"] if (folder / "pytorch_model_fsdp_0").is_dir() \
        else [folder]
    return [dcp.FileSystemReader(s).read_metadata() for s in subs]


def expected_multipliers(dst: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """DCP key of each rescaled weight -> S, from the record (W' = S * W)."""
    ckpt = open_dcp(dst)
    record, scales = read_record(dst)
    o, lay, out = record["options"], ckpt.layout, {}
    for i in range(lay.layers):
        roles = lay.layer_roles(i)
        shapes = {r: ckpt.weights[n].size for r, n in roles.items()}
        for role, m in solve.layer_multipliers(lay, i, shapes, tuple(o["targets"]), o["granularity"],
                                               layer_scales(scales, i)).items():
            out[ckpt.weights[roles[role]].key] = (roles[role], m)
    from wisca_cli.dcp_api import _final_names, _final_shapes
    from wisca_cli.record import final_scales
    names = _final_names(ckpt)
    for role, m in solve.final_multipliers(lay, _final_shapes(ckpt), tuple(o["targets"]), o["granularity"],
                                           final_scales(scales)).items():
        out[ckpt.weights[names[role]].key] = (names[role], m)
    ckpt.close()
    return out


def assert_rescaled(src: Path, dst: Path) -> dict:
    """Every entry of dst is src's: weights times S, moments / S or / S**2 (bit for bit),
    everything else unchanged."""
    a, b = entries(src), entries(dst)
    assert a.keys() == b.keys()
    mults = expected_multipliers(dst)
    assert any(bool((m != 1).any()) for _, m in mults.values())
    wrappers = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
    by_param = {wrappers.sub("", key): m for key, (_, m) in mults.items()}   # the parameter's FQN, as saved
    moved = 0
    for key, va in a.items():
        vb = b[key]
        if not isinstance(va, torch.Tensor):
            assert va == vb, key                  # step counts, lr, param_groups, train state
            continue
        expect = va
        if key in mults:
            expect = va * mults[key][1].to(va.dtype)
        elif key.startswith("optimizer.state."):
            fqn, _, moment = key[len("optimizer.state."):].rpartition(".")
            fqn = wrappers.sub("", fqn)
            name = next((n for n in by_param if fqn == n or n.endswith("." + fqn)), None)
            if name is not None and MOMENT_POWERS[moment]:
                expect = va / by_param[name].to(va.dtype) ** MOMENT_POWERS[moment]
                moved += 1
        assert torch.equal(vb, expect), key
    stated = {wrappers.sub("", k[len("optimizer.state."):].rpartition(".")[0]) for k in a if k.startswith("optimizer.state.")}
    trained = [n for n in by_param if any(n == f or n.endswith("." + f) for f in stated)]   # a parameter no gradient
    assert moved >= 2 * len(trained)               # reaches has no moments (DeepSeek-V4's indexer); exp_avg and
    assert len(trained) >= len(by_param) // 2      # exp_avg_sq of every other rescaled weight
    return mults


def refused(src: Path, tmp: Path, *args: str, match: str) -> None:
    """`wisca transform SRC` refuses: exit 2, one line holding ``match``, nothing written."""
    dst = tmp / "never"
    res = run_cli("transform", src, dst, *args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not dst.exists()
    assert not any(".wisca-tmp-" in p.name for p in tmp.iterdir())
