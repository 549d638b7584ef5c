"""transform, undo, verify and inspect for torch.distributed checkpoints (``dcp.py``), on
one process or on every rank of a torchrun job.

Every rank runs the same three phases: open (each rank reads the metadata), work (each
rank writes its block of layers into the shared temporary folder), commit (rank 0 writes
the ``.metadata`` files and the record and renames the folder into place). After each
phase the ranks exchange a status, so an error on any rank stops all of them, every
rank raises it (the same exit code everywhere) and the temporary folder goes.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from . import __version__, solve
from .balance import NonFiniteValues
from .dcp import METADATA, PeerFailed, World, open_dcp, read_full, rewrite, write_metadata
from .errors import VerificationFailed, WiscaError
from .options import TransformOptions, final_norm_warnings, model_warnings
from .pairs import FINAL
from .output import StagedOutput, check_target, copy_other_files
from .record import (RECORD_FORMAT, RECORD_NAME, resolve_mode, SCALES_NAME, final_scales, layer_scales, pair_report, read_record, summarise,
                     write_record)
from .record import stamp as record_stamp
from .verifier import StreamVerifier, compute_dtype, probe_ids, resolve_tolerance

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


# -- ranks -------------------------------------------------------------------------------------
def init_distributed() -> bool:
    """Join the torchrun job this process belongs to (gloo on CPU, nccl with GPUs); True when
    this call started the process group (and so should end it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


class RankFailed(WiscaError):
    """The error of another rank, raised on this one with that rank's exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


def _status(e: BaseException, rank: int) -> dict:
    code = getattr(e, "exit_code", None)
    if code is None:
        code = 128 + e.signum if hasattr(e, "signum") else 3
    return {"rank": rank, "peer": isinstance(e, PeerFailed), "code": code,
            "message": str(e) if isinstance(e, WiscaError) else f"{type(e).__name__}: {e}"}


def _phase(world: World, fn: Callable):
    """``fn()`` on every rank, then the ranks compare notes: an error anywhere is raised
    everywhere (this rank's own exception as it is, another rank's as ``RankFailed``)."""
    try:
        value, mine = fn(), None
    except BaseException as e:   # noqa: BLE001 - reported to the other ranks, then re-raised
        value, mine, exc = None, _status(e, world.rank), e
    statuses = [s for s in world.gather(mine) if s is not None]
    if not statuses:
        return value
    first = next((s for s in statuses if not s["peer"]), statuses[0])
    if mine is not None and mine["rank"] == first["rank"]:
        raise exc
    where = f"rank {first['rank']}: " if world.size > 1 else ""
    raise RankFailed(where + first["message"], first["code"])


_TEARDOWN = {"deferred": False, "owned": False}


def defer_teardown() -> None:
    """The CLI ends the process group itself (``end_distributed``), after rank 0 has printed."""
    _TEARDOWN["deferred"] = True


def end_distributed() -> None:
    """Every rank meets here, after rank 0 has printed the job's result or its first error, then the
    process group ends: a rank leaving first would have torchrun stop rank 0 (SIGTERM) before it
    reports, and a rank leaving gloo early can abort its peer. Every rank gets here: ``_phase``
    raises an error of any rank on all of them."""
    if not _TEARDOWN["owned"]:
        return
    import torch.distributed as dist

    _TEARDOWN["owned"] = False
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _run(fn: Callable):
    """``fn(world)`` inside the torchrun job's process group (started here if need be; ended here,
    or by ``end_distributed`` where the CLI deferred it)."""
    owns = init_distributed()
    done = False
    try:
        result = fn(World())
        done = True
        return result
    finally:
        if owns and _TEARDOWN["deferred"]:
            _TEARDOWN["owned"] = True
        elif owns:
            import torch.distributed as dist
            if done:   # every rank past its last collective first: a peer tearing gloo down early aborts the other
                dist.barrier()
            dist.destroy_process_group()


# -- transform and undo -------------------------------------------------------------------------
def _main_dtype(ckpt) -> str:
    roles = ckpt.layout.layer_roles(0) if ckpt.layout.layers else {}
    name = roles.get("q", roles.get("qkv", next(iter(roles.values()), None)))
    return DTYPE_NAMES.get(ckpt.weights[name].dtype, "F32") if name else "F32"


def _rewrite_all(world: World, ckpt, dst_path: Path, overwrite: bool, layer_fn, verifier, progress,
                 finish: Callable[[Path, list[dict]], dict], final_fn=None, extras: dict | None = None) -> dict:
    """The work and commit phases: every rank writes its part into rank 0's temporary
    folder; rank 0 calls ``finish(tmp, payloads)`` (the report; raise to abandon), writes
    the metadata and renames the folder into place. ``extras``: what this rank's layer
    functions collected (scales, counts), filled in by the time its part is written and sent
    along in its payload."""
    staged = StagedOutput(dst_path, overwrite) if world.rank == 0 else None
    try:
        _phase(world, lambda: staged.__enter__() if staged else None)
        tmp = Path(world.broadcast(str(staged.tmp) if staged else None))
        payload = _phase(world, lambda: rewrite(ckpt, tmp, layer_fn, verifier, progress, world, final_fn))
        payload.update(extras or {})
        payloads = world.gather(payload)

        def commit():
            if world.rank != 0:
                return None
            report = finish(tmp, payloads)
            for folder in ckpt.folders:
                storage = {idx: info for p in payloads for idx, info in p["storage"][folder.rel].items()}
                write_metadata(folder, tmp / folder.rel, storage)
            staged.commit()
            return report

        return world.broadcast(_phase(world, commit))
    finally:
        if staged is not None:
            staged.__exit__(None, None, None)


def _verifier(ckpt, exact: bool, probe: tuple, tolerance) -> StreamVerifier:
    ids = probe_ids(ckpt.layout.vocab, *probe)
    dtype = next(iter(ckpt.weights.values())).dtype
    return StreamVerifier(ckpt.layout, ids, exact=exact, tolerance=resolve_tolerance(_main_dtype(ckpt), tolerance),
                          dtype=compute_dtype(dtype, exact))


def _towers(ckpt) -> dict:
    """``other_towers``, as for a safetensors checkpoint (``api._towers_report``): in a multimodal
    model's checkpoint, the weights outside the language model by top-level module (the state
    dict's own ``model.`` dropped), each copied byte for byte with its optimizer state."""
    from .dcp import _canonical, _optimizer_key

    spec = ckpt.layout.spec
    if spec.multimodal is None or ckpt.config.get("model_type") not in spec.multimodal.model_types:
        return {}
    ours = {e.key for e in ckpt.weights.values()}
    towers: dict[str, dict] = {}
    for f in ckpt.folders:
        for key, e in sorted(f.entries.items()):
            if not e.is_tensor or _optimizer_key(key) or key in ours:
                continue
            parts = _canonical(key).split(".")
            parts = parts[1:] if parts[0] == "model" and len(parts) > 1 else parts   # the app state's key
            root = ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])
            t = towers.setdefault(root, {"module": root, "tensors": 0, "bytes": 0, "copied_unchanged": True})
            t["tensors"] += 1
            t["bytes"] += e.nbytes
    return {"other_towers": list(towers.values())} if towers else {}


def _copy_beside(ckpt, tmp: Path) -> None:
    """The checkpoint's other files (Trainer state, tokenizer, ...) and its config.json; the
    data files are written anew, the ``.metadata`` files last (``write_metadata``)."""
    subs = {f.rel for f in ckpt.folders if f.rel}
    for folder in ckpt.folders:
        data = {info.relative_path for info in folder.storage.values()}
        copy_other_files(folder.path, tmp / folder.rel, skip=data | {RECORD_NAME, SCALES_NAME} | (
            subs if not folder.rel else set()))
    dropped = {d.rstrip("/") for d in ckpt.dropped if d.endswith("/")}   # Trainer's optimizer_0/
    if subs or dropped:   # Trainer's checkpoint-N/, Megatron's tracker: the files beside the DCP folders
        copy_other_files(ckpt.root, tmp, skip=subs | dropped | ckpt.skip | {RECORD_NAME, SCALES_NAME})
    for name in ckpt.beside:   # a framework's hidden files beside its DCP folder (OLMo-core's .metadata.json)
        if (ckpt.root / name).is_file():
            shutil.copyfile(ckpt.root / name, tmp / name)
    if not (tmp / "config.json").exists():
        shutil.copyfile(ckpt.config_path, tmp / "config.json")


def _optimizer_report(ckpt, payloads: list[dict], invert: bool, exact: bool) -> dict:
    if ckpt.dropped:
        from .training import RESUME_WITHOUT_STATE

        folders = [d for d in ckpt.dropped if d.endswith("/")]
        what = folders + ([f"{len(ckpt.dropped) - len(folders)} optimizer entries"]
                          if len(ckpt.dropped) > len(folders) else [])
        return {"optimizer": {"file": ", ".join(what), "format": "dcp", "transformed": False,
                              "dropped": what, "resume": RESUME_WITHOUT_STATE}}
    if not ckpt.moments and not ckpt.untouched:
        return {}
    accounting: dict[str, dict[str, int]] = {}
    for p in payloads:
        for moment, counts in p.get("accounting", {}).items():
            mine = accounting.setdefault(moment, {"scaled": 0, "untouched": 0, "copied": 0})
            for how, n in counts.items():
                mine[how] += n
    folders = sorted({e.folder.rel or "." for m in ckpt.moments.values() for e in m.values()} |
                     {e.folder.rel or "." for _, e in ckpt.untouched})
    return {"optimizer": {
        "file": ", ".join(f"{f}/{METADATA}" if f != "." else METADATA for f in folders), "format": "dcp",
        "optimizer": "/".join(sorted({k for m in ckpt.moments.values() for k in m} | {k for k, _ in ckpt.untouched})),
        "transformed": True,
        "tensors": sum(p["counts"]["moments_scaled"] for p in payloads),
        "parameters": len(ckpt.moments), "scaled_parameters": sum(p["counts"]["params_scaled"] for p in payloads),
        "direction": "S (undo)" if invert else "1/S", "exact": exact, "accounting": accounting}}


def transform(src, dst, opts: TransformOptions, progress=None) -> dict:
    return _run(lambda world: _transform(world, src, dst, opts, progress))


def _transform(world: World, src, dst, opts: TransformOptions, progress) -> dict:
    started = time.perf_counter()
    ckpt, dst_path = _phase(world, lambda: _open(src, dst, opts.config, opts.overwrite, opts.training_state))
    try:
        lay, pow2 = ckpt.layout, opts.scales == "pow2"
        exactness = solve.exactness(lay, opts.targets, pow2)
        exact = all(v != "tolerance" for v in exactness.values())
        warnings = model_warnings(opts, src, exact) + final_norm_warnings(opts.targets, lay.spec.targets,
                                                                          lay.tie_embeddings)
        verifier = _verifier(ckpt, exact, (opts.probe_batch, opts.probe_len, opts.seed, opts.probe_ids_file),
                             opts.given_tolerance()) if opts.verify else None
        scales: dict[str, torch.Tensor] = {}
        counts = {"moments_scaled": 0, "params_scaled": 0}

        def balance(layer: int, tensors: dict):
            try:
                new, results = solve.balance_layer(lay, layer, tensors, opts.targets, opts.granularity, opts.norm,
                                                   opts.strength, pow2, inplace=True)
            except NonFiniteValues as e:
                raise WiscaError(f"{ckpt.root}: tensor {lay.layer_roles(layer)[e.role]} contains NaN or Inf") from None
            for kind, r in results.items():
                scales[f"layers.{layer}.{kind}"] = r.scales
            shapes = {role: tuple(t.shape) for role, t in tensors.items()}
            mults = solve.layer_multipliers(lay, layer, shapes, opts.targets, opts.granularity,
                                            {k: r.scales for k, r in results.items()})
            _count(ckpt, lay.layer_roles(layer), mults, counts)
            return new, mults, {kind: pair_report(r) for kind, r in results.items()}

        def balance_final(small: dict, head_blocks, head_dtype):
            try:
                new, results, _ = solve.balance_final(lay, small, head_blocks, head_dtype, opts.targets,
                                                      opts.granularity, opts.norm, opts.strength, pow2)
            except NonFiniteValues as e:
                raise WiscaError(f"{ckpt.root}: final stage tensor {e.role} contains NaN or Inf") from None
            found = {kind: r.scales for kind, r in results.items()}
            scales.update({f"{FINAL}.{kind}": s for kind, s in found.items()})
            mults = solve.final_multipliers(lay, _final_shapes(ckpt), opts.targets, opts.granularity, found)
            _count(ckpt, _final_names(ckpt), mults, counts)
            return new, ({kind: pair_report(r) for kind, r in results.items()} or None), mults

        def finish(tmp: Path, payloads: list[dict]) -> dict:
            layers = sorted((r for p in payloads for r in p["layers"]),
                            key=lambda r: (r["layer"] == "final", r["layer"] if r["layer"] != "final" else 0))
            result = next((p["result"] for p in payloads if p["result"] is not None), None)
            report = {
                "command": "transform", "wisca_version": __version__, "record_format": RECORD_FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": ckpt.source, "output": str(dst_path), "format": "dcp", "ranks": world.size,
                "name_adapter": ckpt.adapter, "config": str(ckpt.config_path),
                "architecture": lay.spec.name, "model_type": ckpt.config.get("model_type"),
                "dtype": _main_dtype(ckpt), "bytes": ckpt.total_bytes, "options": opts.record(),
                "targets_applied": [t for t in opts.targets if t in lay.spec.targets],
                "targets_not_applicable": [t for t in opts.targets if t not in lay.spec.targets],
                "exactness": exactness, "warnings": warnings, "summary": summarise(layers),
                "verification": result.to_dict() if result else None, "scales_file": SCALES_NAME,
                "undo": f"wisca undo {dst_path} RESTORED  (multiplies back by the recorded scales; "
                        f"{'bit-exact' if pow2 else 'exact up to rounding'})",
                "layers": layers, **_towers(ckpt),
            }
            if result is not None and not result.passed:
                raise VerificationFailed(result.failure(), report)
            _copy_beside(ckpt, tmp)
            report["training_state"] = _optimizer_report(ckpt, payloads, False, pow2)
            report["seconds"] = round(time.perf_counter() - started, 3)
            all_scales = {k: v for p in payloads for k, v in p["scales"].items()}
            write_record(tmp, report, all_scales, {"granularity": opts.granularity})
            return report

        return _rewrite_all(world, ckpt, dst_path, opts.overwrite, balance, verifier, progress, finish,
                            balance_final, extras={"scales": scales, "counts": counts})
    finally:
        ckpt.close()


def _count(ckpt, names: dict[str, str], mults: dict, counts: dict) -> None:
    """Rescaled parameters with optimizer state, and their moments (``names``: role -> name)."""
    for role in mults:
        moments = ckpt.moments.get(names[role], {})
        if moments:
            counts["params_scaled"] += 1
            counts["moments_scaled"] += sum(1 for m in moments if m != "step")


def _final_names(ckpt) -> dict[str, str]:
    from .dcp import _stage_list
    return next(s.names for s in _stage_list(ckpt.layout) if s.kind == "final")


def _final_shapes(ckpt) -> dict[str, tuple[int, ...]]:
    return {role: ckpt.weights[n].size for role, n in _final_names(ckpt).items()}


def _open(src, dst, config, overwrite, training_state="transform"):
    ckpt = open_dcp(src, config, training_state)
    try:
        return ckpt, check_target(ckpt.root, Path(dst), overwrite)
    except BaseException:
        ckpt.close()
        raise


def undo(transformed, restored, overwrite: bool = False, verify: bool = True, progress=None,
         config=None) -> dict:
    return _run(lambda world: _undo(world, transformed, restored, overwrite, verify, progress, config))


def _undo(world: World, transformed, restored, overwrite, verify, progress, config) -> dict:
    started = time.perf_counter()
    ckpt, dst_path = _phase(world, lambda: _open(transformed, restored, config, overwrite))
    try:
        record, scales = _phase(world, lambda: read_record(ckpt.root))
        o, lay = record["options"], ckpt.layout
        targets = tuple(o["targets"])
        pow2 = all(v != "tolerance" for v in solve.exactness(lay, targets, o["scales"] == "pow2").values())
        verifier = _verifier(ckpt, pow2, (o["probe_batch"], o["probe_len"], o["seed"], None), None) \
            if verify else None
        counts = {"moments_scaled": 0, "params_scaled": 0}

        def unscale(layer: int, tensors: dict):
            mine = layer_scales(scales, layer)
            try:
                new = solve.unscale_layer(lay, layer, tensors, targets, o["granularity"], mine, inplace=True)
            except KeyError as e:
                raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales layers.{layer}.{e.args[0]} missing "
                                 f"or of the wrong size") from e
            shapes = {role: tuple(t.shape) for role, t in tensors.items()}
            mults = {role: 1.0 / m for role, m in
                     solve.layer_multipliers(lay, layer, shapes, targets, o["granularity"], mine).items()}
            _count(ckpt, lay.layer_roles(layer), mults, counts)
            return new, mults, {}

        def unscale_final(small: dict, head_blocks, head_dtype):
            recorded = final_scales(scales)
            try:
                new, _ = solve.unscale_final(lay, small, targets, o["granularity"], recorded)
            except KeyError as e:
                raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {FINAL}.{e.args[0]} missing "
                                 f"or of the wrong size") from e
            mults = {role: 1.0 / m for role, m in
                     solve.final_multipliers(lay, _final_shapes(ckpt), targets, o["granularity"], recorded).items()}
            _count(ckpt, _final_names(ckpt), mults, counts)
            return new, None, mults

        def finish(tmp: Path, payloads: list[dict]) -> dict:
            result = next((p["result"] for p in payloads if p["result"] is not None), None)
            if result is not None and not result.passed:
                raise VerificationFailed("undo: the restored model does not compute the same function; "
                                         "nothing written", {"verification": result.to_dict()})
            _copy_beside(ckpt, tmp)
            return {"command": "undo", "wisca_version": __version__, "source": str(ckpt.root),
                    "output": str(dst_path), "format": "dcp", "ranks": world.size,
                    "verification": result.to_dict() if result else None,
                    "training_state": _optimizer_report(ckpt, payloads, True, pow2), "warnings": [],
                    "seconds": round(time.perf_counter() - started, 3)}

        return _rewrite_all(world, ckpt, dst_path, overwrite, unscale, verifier, progress, finish, unscale_final,
                            extras={"scales": {}, "counts": counts})
    finally:
        ckpt.close()


# -- verify and inspect (one process) ------------------------------------------------------------
def verify(a, b, mode: str, probe: tuple, tolerance, progress=None, config=None) -> dict:
    started = time.perf_counter()
    ca = open_dcp(a, config)
    try:
        cb = open_dcp(b, config if not (Path(b) / "config.json").is_file() else None)
        try:
            la, lb = ca.layout, cb.layout
            if la.spec.name != lb.spec.name:   # names and rotary layout too (torchtitan's vs HF's)
                raise WiscaError(f"{cb.root}: not the same architecture as {ca.root} "
                                 f"({lb.spec.name} vs {la.spec.name})")
            for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
                if getattr(la, key) != getattr(lb, key):
                    raise WiscaError(f"{cb.root}: not the same architecture as {ca.root} ({key} differs)")
            mode = resolve_mode(mode, cb.root)
            v = _verifier(ca, mode == "exact", probe, tolerance)
            result = _verify_walk(ca, cb, v, progress)
            return {"command": "verify", "wisca_version": __version__, "a": str(ca.root), "b": str(cb.root),
                    "format": "dcp", "architecture": la.spec.name, "verification": result.to_dict(),
                    "warnings": [], "seconds": round(time.perf_counter() - started, 3)}
        finally:
            cb.close()
    finally:
        ca.close()


def _verify_walk(ca, cb, v: StreamVerifier, progress):
    """Both checkpoints' stages into the verifier, as ``stream`` feeds them: the embed and final
    stages' small tensors whole, their big ones (embedding, per-layer embedding, head) in row blocks."""
    from .dcp import _stage_list
    from .stream import _feed_verifier

    la = ca.layout
    ends = [{s.kind: s for s in _stage_list(c.layout) if s.kind != "layer"} for c in (ca, cb)]

    def small(c, s) -> dict:
        return {role: read_full(c.weights[n]) for role, n in s.names.items() if role not in s.streamed}

    def stage(kind: str):
        sa, sb = ends[0][kind], ends[1][kind]
        streams = [(role, _row_pairs(ca.weights[sa.names[role]], cb.weights[sb.names[role]])) for role in sa.streamed]
        return _feed_verifier(v, kind, sa.layer, small(ca, sa), small(cb, sb), streams)

    stage("embed")
    for i in range(la.layers):
        ra, rb = la.layer_roles(i), cb.layout.layer_roles(i)
        ta = {role: read_full(ca.weights[n]) for role, n in ra.items()}
        tb = {role: read_full(cb.weights[rb[role]]) for role in ra}
        _feed_verifier(v, "layer", i, ta, tb)
        if progress:
            progress(2 * sum(ca.weights[n].nbytes for n in ra.values()), f"layer {i}")
    return stage("final")


def _row_pairs(ea, eb):
    """(first row, rows of A, rows of B) of two big tensors: a chunk at a time when both are
    stored in the same row blocks (an embedding never whole in memory), else whole."""
    from .dcp import _row_blocks
    pa, pb = sorted(ea.pieces(), key=lambda p: p[1]), sorted(eb.pieces(), key=lambda p: p[1])
    if _row_blocks(ea) and _row_blocks(eb) and [p[1:] for p in pa] == [p[1:] for p in pb]:
        for (ia, offsets, _), (ib, _, _) in zip(pa, pb):
            yield offsets[0], ea.load(ia), eb.load(ib)
    else:
        yield 0, read_full(ea), read_full(eb)


class Readable:
    """A DCP checkpoint as ``api``'s inspect reads one: ``layout``, ``read(name)``, ``root``."""

    def __init__(self, ckpt):
        self.ckpt, self.layout, self.root, self.source = ckpt, ckpt.layout, ckpt.root, ckpt.source
        self.tensors = ckpt.tensors

    def read(self, name: str) -> torch.Tensor:
        return read_full(self.ckpt.weights[name])

    def close(self) -> None:
        self.ckpt.close()


def open_readable(src, config=None) -> Readable:
    return Readable(open_dcp(src, config))
