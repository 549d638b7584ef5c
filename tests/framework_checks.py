"""What every real-framework test checks: a checkpoint the framework wrote, transformed by
wisca (one process and a 2-rank torchrun job: the same entries), loaded back by the
framework's own loader at world size 1 and 2 (bit-identical logits in its own forward, two
more training steps), every weight changed by powers of two only, every moment / S and / S**2
bit for bit, everything else as it was, and `wisca undo` giving the source's entries back.

The frameworks' scripts live in ``tests/frameworks/<framework>/`` and run under torchrun
(gloo, CPU): ``make_ckpt.py`` (the framework's own model, parallelisation, optimizer and
save path) and ``check_load.py`` (its own loader, forward and training step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import run_cli
from dcp_helpers import entries, expected_multipliers

FRAMEWORKS = Path(__file__).resolve().parent / "frameworks"
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore",
       "TRANSFORMERS_VERBOSITY": "error"}
POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "step": 0}


def torch_reads_olmo_core_metadata() -> None:
    """OLMo-core's ``.metadata`` pickles its own storage-info class, which these checks read
    with torch's FileSystemReader in this environment (OLMo-core lives in its own): the
    class's module made to name torch's class, which has the same fields (wisca itself reads
    it with a stand-in, ``unpickle.py``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    module = stub_module("olmo_core.distributed.checkpoint.filesystem")
    if module is not None:
        module._StorageInfo = _StorageInfo


def stub_module(name: str):
    """An empty module registered as ``name`` (and its parents) for unpickling a framework's
    classes without the framework; None when ``name`` is already imported."""
    import types

    if name in sys.modules:
        return None
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


def framework_python(name: str, requirements: str = "requirements.txt") -> str:
    """The Python of ``name``'s own environment where its pins disagree with the test
    environment's (``tests/frameworks/<name>/<requirements>``; torch pinned by a constraints
    file, so no other build is fetched): built once, cached under $WISCA_TEST_ENVS or
    ~/.cache/wisca-test-envs, keyed by the requirements and this Python. Without such a file:
    this environment's Python.

    A line ``# unpack: PKG==VERSION for PYTHON`` names a wheel published for another Python
    only (megatron-core >= 0.17 says Python >= 3.12; this machine's CPU build of torch is for
    3.11, and the 3.12 one would be the multi-GB CUDA build): its wheel for that Python is
    unpacked into the environment without its compiled extensions, which the tests do not
    import."""
    import fcntl
    import hashlib

    req = FRAMEWORKS / name / requirements
    if not req.is_file():
        return sys.executable
    key = hashlib.sha256(req.read_bytes() + sys.version.encode()).hexdigest()[:12]
    name = f"{name}-{req.stem}" if requirements != "requirements.txt" else name
    base = Path(os.environ.get("WISCA_TEST_ENVS", Path.home() / ".cache" / "wisca-test-envs"))
    base.mkdir(parents=True, exist_ok=True)
    root, py = base / f"{name}-{key}", base / f"{name}-{key}" / "bin" / "python"
    with open(base / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
            pins = [ln for ln in req.read_text().split() if ln.startswith("torch==")]
            (root / "constraints.txt").write_text("\n".join(pins) + "\n")
            res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "-c", str(root / "constraints.txt"), "-r", str(req)],
                                 capture_output=True, text=True, timeout=1800)
            assert res.returncode == 0, f"building {root} failed: " + res.stderr[-3000:]
            for line in req.read_text().splitlines():
                if line.startswith("# unpack:"):
                    _unpack_wheel(py, root, *line.removeprefix("# unpack:").split(" for "))
            (root / ".complete").write_text(req.read_text())
    return str(py)


def _unpack_wheel(py: Path, root: Path, pin: str, python: str) -> None:
    """Unpack ``pin``'s wheel for ``python`` into the environment at ``root`` (no ``.so`` files)."""
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([str(py), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                              "--only-binary=:all:", "--python-version", python.strip(), "-d", tmp, pin.strip()],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"downloading {pin} failed: " + res.stderr[-3000:]
        site = next(root.glob("lib/python*/site-packages"))
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site, [n for n in z.namelist() if not n.endswith(".so")])


def torchrun(nproc: int, *args, timeout: int = 420, python: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([python or sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", str(nproc), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **ENV})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return res


def transform_both_ways(src: Path, out: Path, config: Path) -> dict:
    """`wisca transform` in one process and as a 2-rank torchrun job: the same entries."""
    res = run_cli("transform", src, out, "--config", config, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    ranks = out.parent / (out.name + "-torchrun")
    torchrun(2, "-m", "wisca_cli", "transform", src, ranks, "--config", config)
    a, b = entries(_dcp(out)), entries(_dcp(ranks))
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k
    return report


def _dcp(folder: Path) -> Path:
    return folder / "model_and_optim" if (folder / "model_and_optim").is_dir() else folder


def load_back(framework: str, flavor: str, ckpt: Path, probe: Path, tmp: Path, world: int) -> dict:
    """The framework's own loader, at ``world`` ranks: logits on the probe, two more steps."""
    result = tmp / f"loaded-{flavor}-w{world}.pt"
    torchrun(world, FRAMEWORKS / framework / "check_load.py", "--flavor", flavor, "--ckpt", ckpt,
             "--probe", probe, "--out", result, python=framework_python(framework))
    return torch.load(result, weights_only=False)


def assert_loaded_exactly(loaded: dict, probe: Path) -> None:
    want = torch.load(probe, weights_only=True)["logits"]
    assert torch.equal(loaded["logits"], want), (loaded["logits"] - want).abs().max()
    assert len(loaded["losses"]) == 2 and all(math.isfinite(x) for x in loaded["losses"])


def _is_pow2(r: torch.Tensor) -> bool:
    mant, _ = torch.frexp(r)
    return bool((mant.abs() == 0.5).all())


def assert_rescaled(src: Path, dst: Path, model_prefix: str, optimizer_prefix: str,
                    fused: dict[str, tuple[str, str, str]] | None = None, kv_heads: int = 0) -> dict:
    """Every weight S * W (S a power of two per unit), its moments / S and / S**2, a fused
    moment (``fused``: fused parameter key -> the keys of its q, k, v weights, rows grouped per
    kv head) / its parts' S, everything else equal. Returns the counts checked."""
    a, b = entries(_dcp(src)), entries(_dcp(dst))
    assert a.keys() == b.keys()
    mults = {key: m for key, (_, m) in expected_multipliers(dst).items()}
    assert mults, "nothing was rescaled"
    state = optimizer_prefix + "state."
    expect, checked = {}, {"weights": 0, "moments": 0, "fused": 0, "exp_avg_scaled": 0}
    for key, m in mults.items():
        s = m.double().expand(a[key].shape)
        expect[key] = (a[key].double() * s).to(a[key].dtype)
        ratio = b[key].double()[a[key] != 0] / a[key].double()[a[key] != 0]
        assert _is_pow2(ratio), key
        checked["weights"] += 1
        for moment, p in POWERS.items():
            mk = f"{state}{key[len(model_prefix):]}.{moment}"
            if mk in a and p:
                expect[mk] = (a[mk].double() / s ** p).to(a[mk].dtype)
                checked["moments"] += 1
                checked["exp_avg_scaled"] += moment == "exp_avg" and not bool((s == 1).all())
    for fused_key, parts in (fused or {}).items():
        q, k, v = (mults.get(p) for p in parts)
        shapes = [a[p].shape for p in parts]
        full = [torch.ones(sh, dtype=torch.float64) if m is None else m.double().expand(sh)
                for m, sh in zip((q, k, v), shapes)]
        rows = [t.shape[0] // kv_heads for t in full]
        groups = [torch.cat([full[0][g * rows[0]:(g + 1) * rows[0]], full[1][g * rows[1]:(g + 1) * rows[1]],
                             full[2][g * rows[2]:(g + 1) * rows[2]]]) for g in range(kv_heads)]
        s = torch.cat(groups)
        for moment, p in POWERS.items():
            mk = f"{state}{fused_key[len(model_prefix):]}.{moment}"
            if mk in a and p:
                assert mk not in expect
                expect[mk] = (a[mk].double() / s ** p).to(a[mk].dtype)
                checked["fused"] += 1
                checked["exp_avg_scaled"] += moment == "exp_avg" and not bool((s == 1).all())
    for key, va in a.items():
        want = expect.get(key, va)
        vb = b[key]
        assert torch.equal(vb, want) if isinstance(va, torch.Tensor) else vb == want, key
    return checked


def assert_undone(src: Path, out: Path, tmp: Path) -> None:
    back = tmp / "restored"
    res = run_cli("undo", out, back)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = entries(_dcp(src)), entries(_dcp(back))
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k


def as_step(folder: Path, tmp: Path, name: str) -> Path:
    """A copy of ``folder`` named like a saved step (``step-3``, ``step3``), for the loaders."""
    dst = tmp / f"as-{name}-{folder.name}" / name
    shutil.copytree(folder, dst)
    return dst
