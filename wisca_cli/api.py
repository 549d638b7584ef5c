"""The Python API: transform, verify, inspect and undo a checkpoint.

Each function streams the checkpoint one decoder layer at a time: read the layer's
tensors once, compute and apply the scales, feed the original and the new layer to the
verifier, write the new tensors into output shards laid out up front. The output folder
is renamed into place only after verification passed.

    import wisca_cli as wisca
    report = wisca.transform("ckpt/", "ckpt-wisca/")              # pow2, bit-exact, verified
    wisca.verify("ckpt/", "ckpt-wisca/")["verification"]["passed"]  # True
    wisca.undo("ckpt-wisca/", "ckpt-restored/")                   # bit-identical tensors again
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from . import solve
from .balance import NonFiniteValues, PairResult
from .checkpoint import ITEMSIZE, Checkpoint, ShardWriter, as_tensor, open_checkpoint, to_raw
from .memory import SlabPool, carve, slab_bytes
from .errors import VerificationFailed, WiscaError
from .output import StagedOutput, check_target, copy_other_files
from .options import (DEFAULT_TARGETS, OPTIONS, PROBE_FIELDS, TOLERANCE_FIELDS, OptionError, check,
                      default)
from .pairs import layer_pairs
from .verify import StreamVerifier, Tolerance, compute_dtype, probe_ids, resolve_tolerance

RECORD_NAME = "wisca.json"
SCALES_NAME = "wisca_scales.safetensors"
RECORD_FORMAT = 1
Progress = Callable[[int, str], None]   # (bytes done since last call, what is happening)


@dataclass
class TransformOptions:
    """The options of ``transform``; defaults and valid values come from ``options.OPTIONS``."""

    targets: tuple[str, ...] = default("targets")
    granularity: str = default("granularity")
    norm: str = default("norm")
    strength: float = default("strength")
    scales: str = default("scales")                 # "pow2" or "continuous"
    verify: bool = default("verify")
    probe_batch: int = default("probe_batch")
    probe_len: int = default("probe_len")
    seed: int = default("seed")
    probe_ids_file: str | None = None
    max_kl: float | None = None                      # tolerance fields: None = the dtype's default
    min_top1: float | None = None
    max_rel: float | None = None
    tolerance: Tolerance | dict | None = None        # all three at once (fields left None: default)
    overwrite: bool = default("overwrite")
    revision: str | None = None
    base: str | None = None                          # LoRA adapters: base model folder for the logits check
    given: frozenset = frozenset()                   # fields the caller set explicitly

    @classmethod
    def build(cls, options: "TransformOptions | None" = None, **kwargs) -> "TransformOptions":
        """``options`` with the fields in ``kwargs`` replaced, validated."""
        names = {f.name for f in fields(cls)} - {"given"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionError(unknown[0], f"unknown option (options: {', '.join(sorted(names))})")
        base = options or cls()
        values = {n: getattr(base, n) for n in names}
        values.update(kwargs)
        opts = cls(**values, given=frozenset(base.given) | frozenset(kwargs))
        opts.check()
        return opts

    def is_given(self, name: str) -> bool:
        """Set by the caller: named in ``build``'s keywords, or different from the default."""
        if name == "tolerance":
            return self.tolerance is not None
        return name in self.given or getattr(self, name) != (OPTIONS[name].default if name in OPTIONS else None)

    def check(self) -> None:
        for name in OPTIONS:
            if hasattr(self, name):
                setattr(self, name, check(name, getattr(self, name)))
        given = self.given_tolerance()
        for name in TOLERANCE_FIELDS:
            check(name, given.get(name))

    def given_tolerance(self) -> dict:
        """The tolerance fields the caller set (the rest stay the dtype's defaults)."""
        tol = self.tolerance
        out = dict(asdict(tol) if isinstance(tol, Tolerance) else (tol or {}))
        out.update({k: getattr(self, k) for k in TOLERANCE_FIELDS if getattr(self, k) is not None})
        return {k: v for k, v in out.items() if v is not None}

    def record(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("overwrite", "tolerance", "given", *TOLERANCE_FIELDS)}
        d["targets"] = list(self.targets)
        d["tolerance"] = self.given_tolerance() or None
        return d


def _not_applicable(opts: TransformOptions, names, why: str) -> list[dict]:
    """Warnings for options the caller set that this input does not use."""
    return [{"option": n, "message": f"ignored: {why}"} for n in names if opts.is_given(n)]


def _model_warnings(opts: TransformOptions, src, exact: bool) -> list[dict]:
    out = []
    if not opts.verify:
        return out + _not_applicable(opts, (*PROBE_FIELDS, *TOLERANCE_FIELDS, "tolerance"), "verification is off")
    if opts.probe_ids_file:
        out += _not_applicable(opts, ("probe_batch", "probe_len", "seed"), "probe_ids_file gives the probe tokens")
    if exact:
        out += _not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"),
                               "these scales verify bit for bit (mode exact); tolerances apply to continuous "
                               "scales and inexact targets")
    return out


# -- streaming -------------------------------------------------------------------------------
@dataclass
class Stage:
    kind: str                    # "embed", "layer", "final"
    layer: int
    names: dict[str, str]        # role -> tensor name
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    streamed: tuple[str, ...] = ()   # roles too big to hold: read in row blocks when used
    slab: torch.Tensor | None = None  # the memory ``raw`` lives in, owned until ``release``
    pool: SlabPool | None = None
    cursor: int = 0                   # the slab's bytes from here on are free

    def tensors(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        return {role: as_tensor(ckpt.tensors[self.names[role]], raw) for role, raw in self.raw.items()}

    def held(self) -> list[str]:
        return [name for role, name in self.names.items() if role not in self.streamed]

    def release(self) -> None:
        """Hand the slab back for a later stage (after the last use of ``raw``)."""
        if self.pool is not None and self.slab is not None:
            self.pool.release(self.slab)
        self.slab = None
        self.raw = {}


def _stages(ckpt: Checkpoint) -> list[Stage]:
    lay, spec = ckpt.layout, ckpt.layout.spec
    embed = {"embed": spec.embed}
    if spec.embedding.get("positions"):                 # learned positions (GPT-2)
        embed["pos"] = spec.embedding["positions"]
    stages = [Stage("embed", -1, embed, streamed=("embed",))]
    stages += [Stage("layer", i, lay.layer_roles(i)) for i in range(lay.layers)]
    head = spec.embed if lay.tie_embeddings else spec.lm_head
    final = {"norm": spec.final_norm, "head": head}
    if spec.final.get("norm_bias"):                     # LayerNorm families
        final["norm_bias"] = spec.final["norm_bias"]
    stages.append(Stage("final", lay.layers, final, streamed=("head",)))
    return stages


ADVISE_STREAMED = 256 << 20   # read-ahead hint for a streamed (embedding-sized) tensor


def _stage_pool(items: list[tuple[Checkpoint, Stage]], count: int, room_for_blocks: bool = False) -> SlabPool:
    """Slabs big enough for the largest stage's held tensors (``room_for_blocks``: plus
    one row block of its streamed tensor, see ``_stream_big``)."""
    def need(ckpt: Checkpoint, stage: Stage) -> int:
        sizes = [ckpt.tensors[n].nbytes for n in stage.held()]
        if room_for_blocks:
            sizes += [ckpt.chunk_bytes(stage.names[r]) for r in stage.streamed]
        return slab_bytes(sizes)

    return SlabPool(count, max(need(c, s) for c, s in items), prefill=True)


def _read_stages(items: list[tuple[Checkpoint, Stage]], slabs: SlabPool,
                 align: Callable[[str], int] | None = None) -> Iterator[Stage]:
    """Yield the stages (of one checkpoint, or of two interleaved) with their bytes read
    into slabs; the next stage is read while this one computes. The consumer calls
    ``stage.release()`` when done with a stage (after its bytes are written), which lets
    the reader go on.

    ``align(name)``: the output file offset of a tensor, so its buffer can go to the disk
    without a copy."""
    def load(i: int) -> Stage:
        ckpt, stage = items[i]
        if i + 1 < len(items):   # the disk fetches the stage after this one meanwhile
            nckpt, nstage = items[i + 1]
            for role, name in nstage.names.items():
                nckpt.advise(name, ADVISE_STREAMED if role in nstage.streamed else None)
        slab, cursor, raw = slabs.acquire(), 0, {}
        for role in stage.names:
            if role in stage.streamed:
                continue
            name = stage.names[role]
            info = ckpt.tensors[name]
            out, cursor = carve(slab, info.nbytes, cursor, align(name) if align else None, ITEMSIZE[info.dtype])
            raw[role] = ckpt.read_raw(name, out=out)
        return Stage(stage.kind, stage.layer, stage.names, raw, stage.streamed, slab, slabs, cursor)

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(load, 0) if items else None
            for i in range(len(items)):
                stage = pending.result()
                pending = pool.submit(load, i + 1) if i + 1 < len(items) else None
                yield stage
                del stage
        finally:
            slabs.close()   # a reader waiting for a slab wakes up, so the pool can shut down


class _WriteQueue:
    """Writes run in one thread, in submission order, with at most ``depth`` batches in
    flight: the compute never waits for the disk unless the disk falls ``depth`` behind,
    and memory stays bounded."""

    def __init__(self, pool: ThreadPoolExecutor, depth: int = 1):
        self.pool, self.depth, self.pending = pool, depth, deque()

    def put(self, items: list[tuple[Callable, tuple]]) -> None:
        self.pending.append(self.pool.submit(_run_all, items))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()


def _run_all(items: list[tuple[Callable, tuple]]) -> None:
    for fn, args in items:
        fn(*args)


def _check_finite(ckpt: Checkpoint, stage: Stage, tensors: dict[str, torch.Tensor],
                  skip: set[str] = frozenset()) -> None:
    """Refuse NaN or Inf in a stage's tensors (``skip``: roles the balancing checks itself)."""
    for role, t in tensors.items():
        if role not in skip:
            _require_finite(ckpt, stage.names[role], t)


def _nonfinite_error(ckpt: Checkpoint, name: str) -> WiscaError:
    return WiscaError(f"{ckpt.root / ckpt.tensors[name].shard}: tensor {name} contains NaN or Inf")


def _require_finite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> None:
    """Refuse NaN or Inf, naming the tensor (min and max propagate NaN; one fast pass)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise _nonfinite_error(ckpt, name)


def _stream_big(ckpt: Checkpoint, name: str, writer: ShardWriter | None = None,
                queue: _WriteQueue | None = None, chunks: SlabPool | None = None,
                stage: Stage | None = None):
    """Yield row blocks of a big untouched tensor, checked and (with a writer) copied out.

    Blocks are read into ``chunks`` slabs (each handed back once written), or, without a
    writer, into the free end of ``stage``'s slab (one block at a time: the consumer is
    done with a block when it asks for the next)."""
    info = ckpt.tensors[name]
    align = writer.offset(name) if writer is not None else None
    held: list[torch.Tensor] = []

    def from_pool(nbytes: int, at: int | None) -> torch.Tensor:
        held.append(chunks.acquire())
        return carve(held[-1], nbytes, 0, at, ITEMSIZE[info.dtype])[0]

    def from_stage(nbytes: int, at: int | None) -> torch.Tensor:
        return carve(stage.slab, nbytes, stage.cursor, at, ITEMSIZE[info.dtype])[0]

    buffer = from_pool if chunks is not None else from_stage if stage is not None and writer is None else None
    for start, raw, rows in ckpt.row_chunks(name, align=align, buffer=buffer):
        _require_finite(ckpt, name, rows)
        done = [(chunks.release, (held.pop(),))] if chunks else []
        if writer is not None:
            offset = start * (info.nbytes // max(info.shape[0], 1))
            queue.put([(writer.write_part, (name, offset, raw, offset + raw.numel() == info.nbytes)), *done])
            done = []
        try:
            yield start, rows
        finally:   # also when the consumer closes the generator early
            del raw, rows
            _run_all(done)


def _chunk_pool(items: list[tuple[Checkpoint, Stage]], count: int) -> SlabPool:
    sizes = [ckpt.chunk_bytes(s.names[r]) for ckpt, s in items for r in s.streamed]
    return SlabPool(count, max([slab_bytes([n]) for n in sizes], default=1), prefill=True)


@contextmanager
def _torch_threads(n: int):
    """The pipeline parallelises by task (reader, writer, two model streams), not inside ops."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _main_dtype(ckpt: Checkpoint) -> str:
    roles = ckpt.layout.layer_roles(0) if ckpt.layout.layers else {}
    name = roles.get("q", roles.get("qkv", next(iter(roles.values()), None)))   # fused qkv: Phi-3, GPT-2
    return ckpt.tensors[name].dtype if name else "F32"


def _main_torch_dtype(ckpt: Checkpoint) -> torch.dtype:
    from .checkpoint import DTYPES
    return DTYPES.get(_main_dtype(ckpt), torch.float32)


def _tolerance(ckpt: Checkpoint, given: Tolerance | dict | None) -> Tolerance:
    return resolve_tolerance(_main_dtype(ckpt), given)


def _shard_metadata(meta: dict | None, stamp: dict | None) -> dict | None:
    out = {k: v for k, v in (meta or {}).items() if k != "wisca"}
    if stamp:
        out["wisca"] = json.dumps(stamp, separators=(",", ":"))
    return out or None


# (layer, tensors, before_apply) -> (new tensors by role, report); tensors may be scaled in
# place, but only after before_apply() returns
LayerFn = Callable[[int, dict[str, torch.Tensor], Callable[[], object] | None], tuple[dict[str, torch.Tensor], dict]]
STAGE_SLABS = 3    # one stage being read, one computed, one written
CHUNK_SLABS = 3


def _rewrite(ckpt: Checkpoint, out_dir: Path, layer_fn: LayerFn, verifier: StreamVerifier | None,
             stamp: dict | None, progress: Progress | None,
             checked: Callable[[int], set[str]] | None = None) -> tuple[list[dict], dict | None]:
    """Stream ckpt into out_dir with layer_fn applied to each decoder layer.

    ``checked(layer)``: roles that layer_fn itself refuses NaN and Inf in (so they are
    not scanned twice).

    Threads: one reads the next stage, one writes the previous one, and (when verifying)
    one runs the reference model's layer beside the balancing; the scales are applied in
    place once the reference is done, then the transformed layer runs. Stages live in
    ``STAGE_SLABS`` reused slabs, so memory is a few layers whatever the model size.
    """
    writers = {name: ShardWriter(out_dir / name, shard, _shard_metadata(shard.metadata, stamp))
               for name, shard in ckpt.shards.items()}
    writer_of = lambda name: writers[ckpt.tensors[name].shard]   # noqa: E731
    stages = [(ckpt, s) for s in _stages(ckpt)]
    slabs, chunks = _stage_pool(stages, STAGE_SLABS), _chunk_pool(stages, CHUNK_SLABS)
    layer_reports, result = [], None
    try:
        with _torch_threads(1), ThreadPoolExecutor(1) as write_pool, ThreadPoolExecutor(1) as ref_pool, \
                ThreadPoolExecutor(1) as cand_pool:
            if verifier is not None:
                verifier.pool, verifier.cand_pool = ref_pool, cand_pool
            queue = _WriteQueue(write_pool)
            for stage in _read_stages(stages, slabs, align=lambda n: writer_of(n).offset(n)):
                tensors = stage.tensors(ckpt)
                new: dict[str, torch.Tensor] = {}
                skip = checked(stage.layer) if checked and stage.kind == "layer" else frozenset()
                candidate = []   # the transformed layer's forward, which must end before the slab is reused
                if stage.kind == "layer" and verifier is not None:
                    # the reference layer (and the NaN check) run beside the balancing; the
                    # transformed layer runs beside the next layer's balancing
                    ref = verifier.start_layer(tensors, before=lambda: _check_finite(ckpt, stage, tensors, skip))
                    new, report = layer_fn(stage.layer, tensors, ref.result)
                    future = verifier.finish_layer_async(stage.layer, ref, {**tensors, **new})
                    candidate = [(future.result, ())]
                    layer_reports.append({"layer": stage.layer, **report})
                else:
                    _check_finite(ckpt, stage, tensors, skip)
                    if stage.kind == "layer":
                        new, report = layer_fn(stage.layer, tensors, None)
                        layer_reports.append({"layer": stage.layer, **report})
                # a layer is done with once written; the embed and final stages are still read
                # below (norms, positions), so their slab goes back at the end of the iteration
                release = [(stage.release, ())] if stage.kind == "layer" else []
                queue.put([*((writer_of(stage.names[role]).write,
                              (stage.names[role], to_raw(new[role]) if role in new else raw))
                             for role, raw in stage.raw.items()), *candidate, *release])
                if stage.kind == "embed":
                    name = stage.names["embed"]
                    for start, rows in _stream_big(ckpt, name, writer_of(name), queue, chunks):
                        if verifier is not None:
                            verifier.embed_rows(start, rows, rows)
                    if verifier is not None:
                        verifier.embed_done(tensors, tensors)
                elif stage.kind == "final":
                    name = stage.names["head"]
                    tied = ckpt.layout.tie_embeddings   # the embedding, already written
                    if verifier is not None:
                        verifier.final_norm(tensors["norm"], tensors["norm"], tensors, tensors)
                    if verifier is not None or not tied:
                        for _, rows in _stream_big(ckpt, name, None if tied else writer_of(name), queue, chunks):
                            if verifier is not None:
                                verifier.head_rows(rows, rows)
                    if verifier is not None:
                        result = verifier.result()
                del tensors, new
                if stage.kind != "layer":
                    queue.put([(stage.release, ())])
                if progress:
                    progress(sum(ckpt.tensors[n].nbytes for n in stage.names.values()), _stage_label(stage))
            queue.put([(_copy_passthrough, (ckpt, writers))])
            queue.drain()
            for w in writers.values():
                w.close()
    except OSError as e:
        raise WiscaError(f"{out_dir.parent}: writing the output failed: {e.strerror or e}") from e
    finally:
        slabs.close()
        chunks.close()
        for w in writers.values():
            w.abort()
    return layer_reports, result


def _stage_label(stage: Stage) -> str:
    return f"layer {stage.layer}" if stage.kind == "layer" else stage.kind


def _copy_passthrough(ckpt: Checkpoint, writers: dict[str, ShardWriter]) -> None:
    """Tensors outside the spec (e.g. rotary buffers) are copied byte for byte."""
    known = {n for s in _stages(ckpt) for n in s.names.values()}
    for name, info in ckpt.tensors.items():
        if name not in known:
            writers[info.shard].write(name, ckpt.read_raw(name))


def _summarise(layer_reports: list[dict]) -> dict:
    """Per pair kind: units, dead, clamped, mean |log2 imbalance| before and after."""
    summary: dict[str, dict] = {}
    for rep in layer_reports:
        for kind, p in rep.items():
            if kind == "layer":
                continue
            s = summary.setdefault(kind, {"units": 0, "dead": 0, "clamped": 0, "_b": 0.0, "_a": 0.0,
                                          "_n": 0, "log2_scale_min": 0.0, "log2_scale_max": 0.0})
            live = p["units"] - p["dead"]
            s["units"] += p["units"]
            s["dead"] += p["dead"]
            s["clamped"] += p["clamped"]
            s["_b"] += p["imbalance_before"] * live
            s["_a"] += p["imbalance_after"] * live
            s["_n"] += live
            s["log2_scale_min"] = min(s["log2_scale_min"], p["log2_scale_min"])
            s["log2_scale_max"] = max(s["log2_scale_max"], p["log2_scale_max"])
    for s in summary.values():
        n = max(s.pop("_n"), 1)
        s["imbalance_before"] = s.pop("_b") / n
        s["imbalance_after"] = s.pop("_a") / n
    return summary


def _pair_report(r: PairResult) -> dict:
    live = ~torch.isnan(r.before)
    log2s = torch.log2(r.scales.double())
    mean = lambda x: float(x[live].abs().mean()) if bool(live.any()) else 0.0  # noqa: E731
    return {"units": len(r.scales), "dead": r.dead, "clamped": r.clamped,
            "imbalance_before": mean(r.before), "imbalance_after": mean(r.after),
            "log2_scale_min": float(log2s.min()), "log2_scale_max": float(log2s.max())}


# -- transform -------------------------------------------------------------------------------
def transform(src: str | os.PathLike, dst: str | os.PathLike, options: TransformOptions | None = None,
              progress: Progress | None = None, **kwargs) -> dict:
    """Balance a checkpoint's weight pattern; write it to dst only if it verifies.

    Keyword arguments override fields of ``options`` (``transform(a, b, scales="continuous")``).
    Returns the report (also saved as ``wisca.json`` in dst). Raises ``VerificationFailed``
    (nothing written) or ``WiscaError`` (bad input).
    """
    opts = TransformOptions.build(options, **kwargs)
    if opts.base is not None and not Path(opts.base).is_dir():
        raise OptionError("base", f"{opts.base}: no such folder")
    from .lora import is_adapter, transform_adapter

    if is_adapter(src):   # a PEFT LoRA adapter: balance lora_A / lora_B per rank channel
        warnings = _not_applicable(opts, ("targets", "granularity"), "a LoRA adapter is balanced per rank channel")
        if opts.revision is not None:
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        if not opts.verify:
            warnings += _not_applicable(opts, (*PROBE_FIELDS, *TOLERANCE_FIELDS, "tolerance"), "verification is off")
        else:
            if opts.base is None:
                warnings += _not_applicable(opts, PROBE_FIELDS, "probe tokens are used only with base "
                                                                "(base + adapter logits)")
            if opts.scales == "pow2":
                warnings += _not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"),
                                            "pow2 scales verify bit for bit (mode exact)")
            elif opts.base is None:
                warnings += _not_applicable(opts, ("max_kl", "min_top1"), "logits are compared only with base; "
                                                                          "max_rel bounds the B A products")
        return transform_adapter(src, dst, pow2=opts.scales == "pow2", norm=opts.norm, strength=opts.strength,
                                 overwrite=opts.overwrite, base=opts.base, verify=opts.verify,
                                 probe=(opts.probe_batch, opts.probe_len, opts.seed, opts.probe_ids_file),
                                 tolerance=opts.given_tolerance(), warnings=warnings)
    if opts.base is not None:
        raise OptionError("base", f"applies only to a LoRA adapter; {src} is a model checkpoint")
    started = time.perf_counter()
    ckpt = open_checkpoint(src, opts.revision)
    try:
        dst_path = check_target(ckpt.root, Path(dst), opts.overwrite)
        pow2 = opts.scales == "pow2"
        exactness = solve.exactness(ckpt.layout, opts.targets, pow2)
        exact = all(v != "tolerance" for v in exactness.values())
        tol = _tolerance(ckpt, opts.given_tolerance())
        warnings = _model_warnings(opts, src, exact)
        verifier = None
        if opts.verify:
            ids = probe_ids(ckpt.layout.vocab, opts.probe_batch, opts.probe_len, opts.seed, opts.probe_ids_file)
            verifier = StreamVerifier(ckpt.layout, ids, exact=exact, tolerance=tol,
                                      dtype=compute_dtype(_main_torch_dtype(ckpt), exact))
        scales: dict[str, torch.Tensor] = {}

        def balance(layer: int, tensors: dict[str, torch.Tensor], before_apply):
            try:
                new, results = solve.balance_layer(ckpt.layout, layer, tensors, opts.targets, opts.granularity,
                                                   opts.norm, opts.strength, pow2, inplace=True,
                                                   before_apply=before_apply)
            except NonFiniteValues as e:
                raise _nonfinite_error(ckpt, ckpt.layout.layer_roles(layer)[e.role]) from None
            for kind, r in results.items():
                scales[f"layers.{layer}.{kind}"] = r.scales
            return new, {kind: _pair_report(r) for kind, r in results.items()}

        stamp = {"version": __version__, "record": RECORD_NAME}
        with StagedOutput(dst_path, opts.overwrite) as out:
            layers, result = _rewrite(ckpt, out.tmp, balance, verifier, stamp, progress, checked=lambda layer:
                                      solve.covered_roles(ckpt.layout, layer, opts.targets, opts.granularity))
            report = {
                "command": "transform", "wisca_version": __version__, "record_format": RECORD_FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": ckpt.source, "output": str(dst_path),
                "architecture": ckpt.layout.spec.name, "model_type": ckpt.config.get("model_type"),
                "dtype": _main_dtype(ckpt), "bytes": ckpt.total_bytes,
                "options": opts.record(),
                "targets_applied": [t for t in opts.targets if t in ckpt.layout.spec.targets],
                "targets_not_applicable": [t for t in opts.targets if t not in ckpt.layout.spec.targets],
                "exactness": exactness,
                "warnings": warnings,
                "summary": _summarise(layers),
                "verification": result.to_dict() if result else None,
                "scales_file": SCALES_NAME,
                "undo": f"wisca undo {dst_path} RESTORED  (multiplies back by the recorded scales; "
                        f"{'bit-exact' if pow2 else 'exact up to rounding'})",
                "layers": layers,
            }
            if result is not None and not result.passed:
                where = result.first_diverging_layer
                at = "logits" if where is None else ("embeddings" if where < 0 else f"layer {where}")
                raise VerificationFailed(
                    f"verification failed: outputs diverge at {at} (max abs diff {result.max_abs_diff:.3g}, "
                    f"KL {result.kl:.3g}, top-1 {result.top1:.3f}); nothing written", report)
            copy_other_files(ckpt.root, out.tmp, skip=set(ckpt.shards) | {RECORD_NAME, SCALES_NAME})
            from .training import transform_training_state   # optimizer.pt of a Trainer checkpoint

            report["training_state"] = transform_training_state(
                ckpt.root, out.tmp, _multipliers(ckpt, opts.targets, opts.granularity, scales), list(ckpt.tensors))
            report["seconds"] = round(time.perf_counter() - started, 3)
            try:
                save_file(scales, str(out.tmp / SCALES_NAME),
                          metadata={"wisca_version": __version__, "granularity": opts.granularity})
                (out.tmp / RECORD_NAME).write_text(json.dumps(report, indent=1) + "\n")
            except Exception as e:   # OSError, or the safetensors library's own error for ENOSPC
                raise WiscaError(f"{dst_path.parent}: writing the record failed: {' '.join(str(e).split())}") from e
            out.commit()
        return report
    finally:
        ckpt.close()


# -- undo -----------------------------------------------------------------------------------
def read_record(folder: Path, what: str = "a checkpoint") -> tuple[dict, dict[str, torch.Tensor]]:
    """wisca.json and the recorded scales of a folder written by wisca transform."""
    from safetensors import SafetensorError

    path = folder / RECORD_NAME
    if not path.is_file():
        raise WiscaError(f"{folder}: no {RECORD_NAME}: not {what} written by wisca transform")
    try:
        record = json.loads(path.read_text())
        scales = load_file(str(folder / SCALES_NAME))
    except (OSError, ValueError, SafetensorError) as e:
        raise WiscaError(f"{path}: cannot read the wisca record: {' '.join(str(e).split())}") from e
    if record.get("record_format") != RECORD_FORMAT:
        raise WiscaError(f"{path}: record format {record.get('record_format')!r} is not supported "
                         f"by wisca {__version__}")
    return record, scales


def _multipliers(ckpt: Checkpoint, targets: tuple[str, ...], granularity: str,
                 scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tensor name -> S (W' = S * W) for scales as recorded (``layers.{i}.{kind}``)."""
    lay, out = ckpt.layout, {}
    for layer in range(lay.layers):
        names = lay.layer_roles(layer)
        shapes = {role: ckpt.tensors[n].shape for role, n in names.items()}
        prefix = f"layers.{layer}."
        mine = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
        mults = solve.layer_multipliers(lay, layer, shapes, tuple(targets), granularity, mine)
        out.update({names[role]: m for role, m in mults.items()})
    return out


def scale_multipliers(transformed: str | os.PathLike) -> dict[str, torch.Tensor]:
    """tensor name -> multiplier S (float64, broadcastable) that the transform applied: W' = S * W.

    What a training loop needs to carry its state into the new parametrisation: gradients
    become g / S, Adam's exp_avg / S and exp_avg_sq / S**2.
    """
    ckpt = open_checkpoint(transformed)
    try:
        record, scales = read_record(ckpt.root)
        return _multipliers(ckpt, tuple(record["options"]["targets"]), record["options"]["granularity"], scales)
    finally:
        ckpt.close()


def undo(transformed: str | os.PathLike, restored: str | os.PathLike, overwrite: bool = default("overwrite"),
         verify: bool = default("verify"), progress: Progress | None = None) -> dict:
    """Multiply back by the recorded scales: for pow2 scales the original tensors exactly."""
    from .lora import is_adapter_record, undo_adapter

    if is_adapter_record(transformed):
        return undo_adapter(transformed, restored, overwrite=overwrite, verify=verify)
    started = time.perf_counter()
    ckpt = open_checkpoint(transformed)
    try:
        record, scales = read_record(ckpt.root)
        opts = record["options"]
        dst_path = check_target(ckpt.root, Path(restored), overwrite)
        pow2 = all(v != "tolerance" for v in
                   solve.exactness(ckpt.layout, tuple(opts["targets"]), opts["scales"] == "pow2").values())
        verifier = None
        if verify:
            ids = probe_ids(ckpt.layout.vocab, opts["probe_batch"], opts["probe_len"], opts["seed"])
            verifier = StreamVerifier(ckpt.layout, ids, exact=pow2, tolerance=_tolerance(ckpt, None),
                                      dtype=compute_dtype(_main_torch_dtype(ckpt), pow2))

        def unscale_layer(layer: int, tensors: dict[str, torch.Tensor], before_apply):
            prefix = f"layers.{layer}."
            mine = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
            try:
                return solve.unscale_layer(ckpt.layout, layer, tensors, tuple(opts["targets"]),
                                           opts["granularity"], mine, True, before_apply), {}
            except KeyError as e:
                raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {prefix}{e.args[0]} missing "
                                 f"or of the wrong size") from e

        with StagedOutput(dst_path, overwrite) as out:
            _, result = _rewrite(ckpt, out.tmp, unscale_layer, verifier, None, progress)
            if result is not None and not result.passed:
                raise VerificationFailed("undo: the restored model does not compute the same function; "
                                         "nothing written", {"verification": result.to_dict()})
            copy_other_files(ckpt.root, out.tmp, skip=set(ckpt.shards) | {RECORD_NAME, SCALES_NAME})
            from .training import transform_training_state

            state = transform_training_state(
                ckpt.root, out.tmp, _multipliers(ckpt, tuple(opts["targets"]), opts["granularity"], scales),
                list(ckpt.tensors), invert=True)
            out.commit()
        return {"command": "undo", "wisca_version": __version__, "source": str(ckpt.root),
                "output": str(dst_path), "verification": result.to_dict() if result else None,
                "training_state": state, "warnings": [],
                "seconds": round(time.perf_counter() - started, 3)}
    finally:
        ckpt.close()


# -- verify -----------------------------------------------------------------------------------
def _same_architecture(a: Checkpoint, b: Checkpoint) -> None:
    la, lb = a.layout, b.layout
    keys = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tie_embeddings")
    for key in keys:
        if getattr(la, key) != getattr(lb, key) or la.spec.name != lb.spec.name:
            raise WiscaError(f"{b.root}: not the same architecture as {a.root} ({key} differs)")


def _resolve_mode(mode: str, b_root: Path) -> str:
    """auto: exact unless b's wisca record says its transform rounds."""
    if mode != "auto":
        return mode
    rec = b_root / RECORD_NAME
    try:
        record = json.loads(rec.read_text()) if rec.is_file() else {}
        rounds = record["options"]["scales"] == "continuous" or "tolerance" in record.get("exactness", {}).values()
    except (ValueError, KeyError, TypeError, OSError):
        rounds = False
    return "tolerance" if rounds else "exact"


def verify(a: str | os.PathLike, b: str | os.PathLike, mode: str = default("mode"),
           probe_batch: int = default("probe_batch"), probe_len: int = default("probe_len"),
           seed: int = default("seed"), probe_ids_file: str | None = None,
           tolerance: Tolerance | dict | None = None, progress: Progress | None = None,
           revision: str | None = None, max_kl: float | None = None, min_top1: float | None = None,
           max_rel: float | None = None) -> dict:
    """Do checkpoints a and b compute the same function on the probe tokens?

    mode: "exact" (bit-identical logits), "tolerance", or "auto": exact unless b's wisca
    record says it was transformed with continuous scales. Tolerances: ``max_kl``,
    ``min_top1``, ``max_rel`` (or ``tolerance`` with any of them); those not given are the
    dtype's defaults. Two LoRA adapters are compared by their modules' B A products.
    """
    started = time.perf_counter()
    values = dict(probe_batch=probe_batch, probe_len=probe_len, seed=seed, probe_ids_file=probe_ids_file,
                  tolerance=tolerance, max_kl=max_kl, min_top1=min_top1, max_rel=max_rel, revision=revision)
    opts = TransformOptions.build(**{k: v for k, v in values.items()   # the ones set: not at their defaults
                                     if v != (OPTIONS[k].default if k in OPTIONS else None)})
    check("mode", mode)
    from .lora import is_adapter, verify_adapters

    if is_adapter(a) or is_adapter(b):
        mode = _resolve_mode(mode, Path(b))
        warnings = _not_applicable(opts, PROBE_FIELDS, "adapters are compared by their B A products")
        if opts.revision is not None:
            raise OptionError("revision", f"{a}: only applies to hub repo ids, not local folders")
        if mode == "exact":
            warnings += _not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"), "mode exact")
        report = verify_adapters(a, b, mode == "exact", opts.given_tolerance())
        return {**report, "warnings": warnings, "seconds": round(time.perf_counter() - started, 3)}
    ca = open_checkpoint(a, revision)
    try:
        cb = open_checkpoint(b)
        try:
            _same_architecture(ca, cb)
            mode = _resolve_mode(mode, cb.root)
            warnings = []
            if probe_ids_file:
                warnings += _not_applicable(opts, ("probe_batch", "probe_len", "seed"),
                                            "probe_ids_file gives the probe tokens")
            if mode == "exact":
                warnings += _not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"), "mode exact (bit-identical logits)")
            tolerance = opts.given_tolerance()
            ids = probe_ids(ca.layout.vocab, probe_batch, probe_len, seed, probe_ids_file)
            verifier = StreamVerifier(ca.layout, ids, exact=mode == "exact", tolerance=_tolerance(ca, tolerance),
                                      dtype=compute_dtype(_main_torch_dtype(ca), mode == "exact"))
            result = None
            # one reader, A's and B's stages in turn: A's and B's layer in use, the next one read
            items = [item for sa, sb in zip(_stages(ca), _stages(cb)) for item in ((ca, sa), (cb, sb))]
            slabs = _stage_pool(items, 3, room_for_blocks=True)
            with _torch_threads(1), ThreadPoolExecutor(1) as ref_pool:
                verifier.pool = ref_pool
                reader = _read_stages(items, slabs)
                for sa in reader:
                    sb = next(reader)
                    ta, tb = sa.tensors(ca), sb.tensors(cb)
                    if sa.kind == "layer":
                        ref = verifier.start_layer(ta, before=lambda: _check_finite(ca, sa, ta))
                        _check_finite(cb, sb, tb)
                        verifier.finish_layer(sa.layer, ref, tb)
                        del ta, tb
                        sa.release(), sb.release()
                        if progress:
                            progress(2 * sum(ca.tensors[n].nbytes for n in sa.names.values()), _stage_label(sa))
                        continue
                    _check_finite(ca, sa, ta)
                    _check_finite(cb, sb, tb)
                    if sa.kind == "final":
                        verifier.final_norm(ta["norm"], tb["norm"], ta, tb)
                    role = sa.streamed[0]
                    streams = (_stream_big(ca, sa.names[role], stage=sa), _stream_big(cb, sb.names[role], stage=sb))
                    try:
                        for (start, rows_a), (_, rows_b) in zip(*streams):
                            if sa.kind == "embed":
                                verifier.embed_rows(start, rows_a, rows_b)
                            else:
                                verifier.head_rows(rows_a, rows_b)
                    finally:   # zip leaves the second stream open: hand back its block now
                        for stream in streams:
                            stream.close()
                    if sa.kind == "embed":
                        verifier.embed_done(ta, tb)
                    else:
                        result = verifier.result()
                    del ta, tb
                    sa.release(), sb.release()
                    if progress:
                        progress(2 * sum(ca.tensors[n].nbytes for n in sa.names.values()), _stage_label(sa))
            return {"command": "verify", "wisca_version": __version__, "a": str(ca.root), "b": str(cb.root),
                    "architecture": ca.layout.spec.name, "verification": result.to_dict(),
                    "warnings": warnings, "seconds": round(time.perf_counter() - started, 3)}
        finally:
            cb.close()
    finally:
        ca.close()


# -- inspect ---------------------------------------------------------------------------------
def _layer_pattern(layout, layer: int, tensors: dict[str, torch.Tensor], targets: tuple[str, ...],
                   granularity: str, norm: str) -> dict:
    """One layer's weight pattern: per pair kind, the units' |log2 ratio| and per head (kv
    group, expert or norm) the signed log2(||A|| / ||B||)."""
    from .balance import log2_imbalance, unit_stats

    entry: dict = {"layer": layer}
    for pair in layer_pairs(layout, layer, targets, "channel"):
        units = log2_imbalance(unit_stats(pair.regroup(granularity), tensors), norm)
        heads = log2_imbalance(unit_stats(pair.regroup("head"), tensors), norm)
        live = units[~torch.isnan(units)]
        entry[pair.kind] = {
            "units": len(units), "dead": int(torch.isnan(units).sum()),
            "mean_abs_log2": float(live.abs().mean()) if len(live) else 0.0,
            "max_abs_log2": float(live.abs().max()) if len(live) else 0.0,
            "heads": [None if x != x else round(float(x), 4) for x in heads],
        }
    return entry


def _pattern_summary(layers: list[dict], targets: tuple[str, ...]) -> dict:
    summary = {}
    for kind in targets:
        vals = [(e[kind]["mean_abs_log2"], e[kind]["units"] - e[kind]["dead"]) for e in layers if kind in e]
        n = sum(w for _, w in vals)
        if vals:
            summary[kind] = {"mean_abs_log2": sum(v * w for v, w in vals) / max(n, 1),
                             "max_abs_log2": max(e[kind]["max_abs_log2"] for e in layers if kind in e)}
    return summary


def inspect(src: str | os.PathLike, granularity: str = default("granularity"), norm: str = default("norm"),
            targets: Iterable[str] = DEFAULT_TARGETS, revision: str | None = None,
            progress: Progress | None = None, plot: str | os.PathLike | None = None) -> dict:
    """The weight pattern: per layer and pair kind, log2(||A|| / ||B||) of each unit.

    ``mean_abs_log2`` is the mean |log2 ratio| over the units at ``granularity`` (0 means
    perfectly balanced); ``heads`` gives the signed ratio per head (kv group; per expert
    for MoE ``ffn``). A LoRA adapter folder gives the same per module and rank channel.
    A folder written by ``transform`` also gets ``before``: the pattern of the original,
    reconstructed from the recorded scales. ``plot``: also draw it to this PNG.
    """
    granularity, norm = check("granularity", granularity), check("norm", norm)
    targets = check("targets", targets)
    if plot is not None and not Path(plot).parent.is_dir():
        raise OptionError("plot", f"{plot}: folder {Path(plot).parent} does not exist")
    from .lora import inspect_adapter, is_adapter

    if is_adapter(src):
        if revision is not None:
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        report = inspect_adapter(src, norm)
        report["warnings"] = [{"option": n, "message": "ignored: a LoRA adapter is inspected per rank channel"}
                              for n, v in (("granularity", granularity), ("targets", targets))
                              if v != default(n)]
    else:
        report = _inspect_model(src, granularity, norm, targets, revision, progress)
    if plot is not None:
        from .plot import plot_pattern

        before = report.get("before")
        title = f"weight pattern of {report['source']} ({report['architecture']})" + (
            ": before and after wisca transform" if before else "")
        report["plot"] = str(plot_pattern(before or report, plot, after=report if before else None, title=title))
    return report


def _inspect_model(src, granularity: str, norm: str, targets: tuple[str, ...], revision: str | None,
                   progress: Progress | None) -> dict:
    ckpt = open_checkpoint(src, revision)
    try:
        record = scales = None
        if (ckpt.root / RECORD_NAME).is_file():
            record, scales = read_record(ckpt.root)
        layers, before = [], []
        for i in range(ckpt.layout.layers):
            roles = ckpt.layout.layer_roles(i)
            pairs = layer_pairs(ckpt.layout, i, targets, "channel")
            wanted = {m.role for pair in pairs for m in pair.members}
            if record is not None:
                wanted |= solve.covered_roles(ckpt.layout, i, tuple(record["options"]["targets"]),
                                              record["options"]["granularity"])
            tensors = {role: ckpt.read(roles[role]) for role in wanted}
            layers.append(_layer_pattern(ckpt.layout, i, tensors, targets, granularity, norm))
            if record is not None:
                prefix = f"layers.{i}."
                mine = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
                try:
                    original = {**tensors, **solve.unscale_layer(
                        ckpt.layout, i, tensors, tuple(record["options"]["targets"]),
                        record["options"]["granularity"], mine)}
                except KeyError as e:
                    raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {prefix}{e.args[0]} missing "
                                     f"or of the wrong size") from e
                before.append(_layer_pattern(ckpt.layout, i, original, targets, granularity, norm))
            if progress:
                progress(sum(t.numel() * t.element_size() for t in tensors.values()), f"layer {i}")
        report = {"command": "inspect", "wisca_version": __version__, "source": ckpt.source,
                  "architecture": ckpt.layout.spec.name, "granularity": granularity, "norm": norm,
                  "warnings": [], "summary": _pattern_summary(layers, targets), "layers": layers}
        if record is not None:
            report["before"] = {"source": f"{ckpt.source} before wisca transform (from its record)",
                                "architecture": ckpt.layout.spec.name,
                                "summary": _pattern_summary(before, targets), "layers": before}
        return report
    finally:
        ckpt.close()
