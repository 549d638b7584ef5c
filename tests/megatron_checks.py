"""What every Megatron-core test checks, with megatron-core's own code (``tests/frameworks/
megatron/mc_harness.py``, run in an environment of its own: ``framework_checks.framework_python``).

A checkpoint written by megatron-core's ``dist_checkpointing.save`` (torch_dist) after a few
training steps, unbalanced at a fixed function by powers of two; ``wisca transform`` in one
process and as a 2-rank torchrun job (the same entries); megatron-core's ``dist_checkpointing.load``
into a fresh model and optimizer at TP 1 and TP 2: logits ``torch.equal`` to the source's
loaded the same way, two more training steps; every tensor of the output checked against the
source's element by element, the multiplier read off the weights themselves (so no wisca code
decides what is expected): the weights changed by powers of two only, ``exp_avg / S``,
``exp_avg_sq / S**2``, master weights ``* S`` bit for bit, everything else equal; ``undo``
gives every entry back; ``verify`` and ``inspect`` work (the Python API, in this process: the
CLI on a Megatron folder is the CLI matrix's).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from conftest import run_cli
from framework_checks import FRAMEWORKS, framework_python, stub_module, torchrun

HARNESS = FRAMEWORKS / "megatron" / "mc_harness.py"
VERSIONS = {"0.19.2": "requirements.txt", "0.15.3": "requirements-0.15.txt"}
POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "fp32_param": -1, "param": -1}


def python(version: str) -> str:
    return framework_python("megatron", VERSIONS[version])


def torch_reads_megatron_015_metadata() -> None:
    """megatron-core 0.15's ``.metadata`` pickles its ``MCoreMetadata`` and ``MCoreSavePlan``,
    which these checks read with torch's reader in this environment (megatron lives in its
    own): the module made to name subclasses of torch's classes (wisca itself reads them with
    stand-ins, ``unpickle.py``)."""
    from dataclasses import dataclass

    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import SavePlan

    module = stub_module("megatron.core.dist_checkpointing.strategies.torch")
    if module is None:
        return

    @dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict | None = None

    @dataclass(frozen=True)
    class MCoreSavePlan(SavePlan):
        mcore_data: dict | None = None

    for cls in (MCoreMetadata, MCoreSavePlan):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)


def _model_args(qk_norm: bool, moe: str | None) -> list:
    return [*(["--qk-norm"] if qk_norm else []), *(["--moe", moe] if moe else [])]


def make(version: str, root: Path, tp: int, optim: str, qk_norm: bool = False, moe: str | None = None) -> Path:
    world = 2 if optim == "dist-dp" else tp
    torchrun(world, HARNESS, "make", "--out", root, "--tp", tp, "--optim", optim, *_model_args(qk_norm, moe),
             python=python(version))
    return root


def resume(version: str, src: Path, other: Path, tps: tuple[int, ...], optim: str, qk_norm: bool,
           moe: str | None, out: Path) -> dict:
    """megatron-core's own load of ``src`` and ``other`` at each TP of ``tps`` in turn, by the
    same ranks (fresh models and optimizers each time): {tp: their logits, and two training
    steps from ``other``}."""
    torchrun(max(tps), HARNESS, "resume", "--src", src, "--other", other, "--tps", ",".join(map(str, tps)),
             "--optim", optim, "--out", out, *_model_args(qk_norm, moe), python=python(version))
    return torch.load(out, weights_only=False)


def entries(folder: Path) -> dict:
    """Every entry of a Megatron torch_dist folder by its key: tensors whole, objects as bytes."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    md = dcp.FileSystemReader(folder).read_metadata()
    out = {}
    for key in md.state_dict_metadata:
        value = sd
        for p in (md.planner_data or {}).get(key, (key,)):
            value = value[p]
        out[key] = value.getvalue() if isinstance(value, io.BytesIO) else value
    return out


def _pow2(r: torch.Tensor) -> bool:
    mant, _ = torch.frexp(r)
    return bool((mant.abs() == 0.5).all())


def assert_rescaled(src: Path, dst: Path) -> dict:
    """Every entry of ``dst`` against ``src``'s: per weight the multiplier S = dst / src
    (elementwise; its fp32 master's where there is one) is a power of two, and every
    optimizer entry of that weight is src's / S**p bit for bit (p: 1 exp_avg, 2 exp_avg_sq,
    -1 masters); objects and everything else equal. Returns counts."""
    a, b = entries(src), entries(dst)
    assert a.keys() == b.keys()
    state = "optimizer.state."
    model = [k for k, v in a.items() if isinstance(v, torch.Tensor) and not k.startswith(state)]
    done, counts = set(), {"weights": 0, "rescaled": 0, "moments": 0, "moments_rescaled": 0, "masters": 0}
    for key in model:
        master = next((state + m + "." + key for m in ("fp32_param", "param") if state + m + "." + key in a), None)
        wa, wb = (a[master], b[master]) if master else (a[key], b[key])
        assert bool((wa != 0).all()), f"{key}: zero weights leave S undetermined"
        s = wb.double() / wa.double()
        assert _pow2(s), key
        assert torch.equal(b[key], (a[key].double() * s).to(a[key].dtype)), key
        counts["weights"] += 1
        counts["rescaled"] += not bool((s == 1).all())
        done.add(key)
        for moment, p in POWERS.items():
            mk = f"{state}{moment}.{key}"
            if mk in a:
                assert torch.equal(b[mk], (a[mk].double() / s ** p).to(a[mk].dtype)), mk
                counts["masters" if p < 0 else "moments"] += 1
                counts["moments_rescaled"] += p > 0 and not bool((s == 1).all())
                done.add(mk)
    for key, va in a.items():
        if key not in done:
            vb = b[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key
            assert not (key.startswith(state) and isinstance(va, torch.Tensor)), f"{key}: state of no weight"
    assert counts["rescaled"] and counts["moments_rescaled"], counts
    return counts


def assert_resumed(result: dict) -> None:
    assert torch.equal(result["logits_src"], result["logits_other"]), \
        (result["logits_src"] - result["logits_other"]).abs().max()
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])


def transform(src: Path, out: Path, config: Path, ranks: bool) -> dict:
    """`wisca transform`; ``ranks``: also as a 2-rank torchrun job, which must give the same entries."""
    res = run_cli("transform", src, out, "--config", config, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    if not ranks:
        return json.loads(res.stdout)
    ranks = out.parent / (out.name + "-torchrun")
    torchrun(2, "-m", "wisca_cli", "transform", src, ranks, "--config", config)
    it = src.name if src.name.startswith("iter_") else (src / "latest_checkpointed_iteration.txt").read_text()
    it = it if it.startswith("iter_") else f"iter_{int(it):07d}"
    one = out if (out / ".metadata").is_file() else out / it
    two = ranks if (ranks / ".metadata").is_file() else ranks / it
    x, y = entries(one), entries(two)
    assert x.keys() == y.keys()
    for k, v in x.items():
        assert torch.equal(v, y[k]) if isinstance(v, torch.Tensor) else v == y[k], k
    return json.loads(res.stdout)


def assert_undone(src_iter: Path, out: Path, tmp: Path, it: str) -> None:
    from wisca_cli import api

    back = tmp / "restored"
    api.undo(out, back)
    a, b = entries(src_iter), entries(back / it if (back / it).is_dir() else back)
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k
