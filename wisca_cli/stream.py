"""The safetensors streaming backend: a checkpoint read once and written once, a few
decoder layers in memory whatever the model size.

Threads: one reads the next stage into one of a few reused slabs (``memory.SlabPool``),
one writes the previous one (``O_DIRECT``, ``fileio``), and when verifying one runs the
reference model's layer beside the balancing. The symmetry core (``pairs``, ``stats``,
``balance``, ``solve``) does the math on the tensors this module hands it; the only
thing this backend adds to it is ``parallel_reduce``, which splits a big tensor's
statistics over two threads and merges the halves (see ``stats``).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import fp8
from .balance import apply_multiplier_, chunk_multiplier
from .checkpoint import DTYPES, ITEMSIZE, Checkpoint, ShardWriter, as_tensor, to_raw
from .errors import WiscaError
from .memory import SlabPool, carve, slab_bytes, trim_heap
from .prefetch import stop_read_ahead
from .record import shard_metadata
from .stats import CHUNK_ELEMENTS, slice_reduce
from .verifier import StreamVerifier, Tolerance, resolve_tolerance

Progress = Callable[[int, str], None]   # (bytes done since last call, what is happening)


# -- statistics on two threads ----------------------------------------------------------------
PARALLEL_MIN = 1 << 22     # tensors at least this big are reduced in two halves at once
_helper = None
_scratch = threading.local()


def _helper_pool() -> ThreadPoolExecutor:
    """One extra thread: a big tensor's second half is reduced there while the caller
    reduces the first (torch ops on cache-sized chunks are too small to split inside)."""
    global _helper
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="wisca-stats")
    return _helper


def _reduce_rows(t: torch.Tensor, axis: int):
    """``stats.slice_reduce`` with this thread's reused chunk buffer (fresh memory costs a
    page fault per 4 KiB)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != (torch.float64 if t.dtype == torch.float64 else torch.float32):
        buf = _scratch.buf = torch.empty(CHUNK_ELEMENTS, dtype=torch.float64 if t.dtype == torch.float64
                                         else torch.float32)
    return slice_reduce(t, axis, scratch=buf)


def parallel_reduce(t: torch.Tensor, axis: int):
    """Per-slice statistics of a big tensor in two row halves on two threads, merged as
    ``UnitStats.merge`` does: per-row results are disjoint (concatenated), per-column
    sums add in float64, max and min combine."""
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    if t.numel() < PARALLEL_MIN or t.shape[0] < 2:
        return _reduce_rows(t, axis)
    half = t.shape[0] // 2
    other = _helper_pool().submit(_reduce_rows, t[half:], axis)
    first = _reduce_rows(t[:half], axis)
    second = other.result()
    if axis == 0:
        return (torch.cat([first[0], second[0]]), first[1], torch.cat([first[2], second[2]]),
                torch.cat([first[3], second[3]]))
    return (first[0] + second[0], first[1] + second[1], torch.maximum(first[2], second[2]),
            torch.minimum(first[3], second[3]))


# -- stages -----------------------------------------------------------------------------------
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
    if spec.embedding.positions:                 # learned positions (GPT-2)
        embed["pos"] = spec.embedding.positions
    streamed = ("embed",)
    if lay.ple_size:                             # Gemma 4's per-layer input embeddings
        ple = spec.per_layer_input
        embed.update({"ple_embed": ple.embed, "ple_proj": ple.projection, "ple_norm": ple.norm})
        streamed = ("embed", "ple_embed")
    stages = [Stage("embed", -1, embed, streamed=streamed)]
    stages += [Stage("layer", i, lay.layer_roles(i)) for i in range(lay.layers)]
    head = spec.embed if lay.tie_embeddings else spec.lm_head
    final = {"norm": spec.final_norm, "head": head}
    if spec.final.norm_bias:                     # LayerNorm families
        final["norm_bias"] = spec.final.norm_bias
    if spec.final.head_bias:                     # a head with a bias (Phi)
        final["head_bias"] = spec.final.head_bias
    if spec.block.hyper is not None:             # DeepSeek-V4: the streams' collapse before the norm
        hyper = spec.block.hyper
        final.update({"hc_fn": hyper.head_fn, "hc_base": hyper.head_base, "hc_scale": hyper.head_scale})
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
        if i + 1 < len(items):   # the disk fetches the stage after this one meanwhile (a no-op
            nckpt, nstage = items[i + 1]   # for files read direct: see Checkpoint.advise)
            for role, name in nstage.names.items():
                nckpt.advise(name, ADVISE_STREAMED if role in nstage.streamed else None)
        slab, cursor, raw = slabs.acquire(), 0, {}
        for role in stage.names:
            if role in stage.streamed:
                continue
            name = stage.names[role]
            info = ckpt.tensors[name]
            at = align(name) if align else info.start   # placed like the file: direct reads need no copy
            out, cursor = carve(slab, info.nbytes, cursor, at, ITEMSIZE[info.dtype])
            raw[role] = ckpt.read_raw(name, out=out)
        return Stage(stage.kind, stage.layer, stage.names, raw, stage.streamed, slab, slabs, cursor)

    stop_read_ahead()   # from here the reader reads: direct where the start-up read-ahead has not been
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


class _Lookahead:
    """An iterator that can show its next item before handing it out (``None`` at the end)."""

    def __init__(self, items: Iterator):
        self.items, self.buffered = iter(items), deque()

    def peek(self):
        if not self.buffered:
            self.buffered.append(next(self.items, None))
        return self.buffered[0]

    def __iter__(self):
        return self

    def __next__(self):
        item = self.buffered.popleft() if self.buffered else next(self.items, None)
        if item is None:
            raise StopIteration
        return item


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
    if fp8.is_fp8(t):   # e4m3fn codes: NaN is the only non-finite value
        if fp8.nan_codes(t):
            raise _nonfinite_error(ckpt, name)
        return
    lo, hi = torch.aminmax(t)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise _nonfinite_error(ckpt, name)


def _stream_big(ckpt: Checkpoint, name: str, writer: ShardWriter | None = None,
                queue: _WriteQueue | None = None, chunks: SlabPool | None = None,
                stage: Stage | None = None, edit: Callable[[int, torch.Tensor], object] | None = None):
    """Yield row blocks of a big tensor, checked and (with a writer) copied out.
    ``edit(first row, rows)`` changes a block in place before it is written (the final
    norm target's column scales on lm_head).

    Blocks are read into ``chunks`` slabs (each handed back once written), or, without a
    writer, into the free end of ``stage``'s slab (one block at a time: the consumer is
    done with a block when it asks for the next)."""
    info = ckpt.tensors[name]
    align = writer.offset(name) if writer is not None else info.start   # see _read_stages
    held: list[torch.Tensor] = []

    def from_pool(nbytes: int, at: int | None) -> torch.Tensor:
        held.append(chunks.acquire())
        return carve(held[-1], nbytes, 0, at, ITEMSIZE[info.dtype])[0]

    def from_stage(nbytes: int, at: int | None) -> torch.Tensor:
        return carve(stage.slab, nbytes, stage.cursor, at, ITEMSIZE[info.dtype])[0]

    buffer = from_pool if chunks is not None else from_stage if stage is not None and writer is None else None
    for start, raw, rows in ckpt.row_chunks(name, align=align, buffer=buffer):
        _require_finite(ckpt, name, rows)
        if edit is not None:
            edit(start, rows)
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
    if name in ckpt.layout.fp8_weights:   # FP8 codes: the model computes in its unquantised tensors' dtype
        name = ckpt.layout.spec.embed
    return ckpt.tensors[name].dtype if name else "F32"


def _main_torch_dtype(ckpt: Checkpoint) -> torch.dtype:
    return DTYPES.get(_main_dtype(ckpt), torch.float32)


def _tolerance(ckpt: Checkpoint, given: Tolerance | dict | None) -> Tolerance:
    return resolve_tolerance(_main_dtype(ckpt), given)


# (layer, tensors, before_apply) -> (new tensors by role, report); tensors may be scaled in
# place, but only after before_apply() returns
LayerFn = Callable[[int, dict[str, torch.Tensor], Callable[[], object] | None], tuple[dict[str, torch.Tensor], dict]]
# (final stage tensors, head_blocks, head dtype) -> (new tensors by role, report or None, role ->
# multiplier of the streamed head's rows): the final norm -> lm_head target
FinalFn = Callable[[dict[str, torch.Tensor], Callable[[], Iterator[tuple[int, torch.Tensor]]], torch.dtype],
                   tuple[dict[str, torch.Tensor], dict | None, dict[str, torch.Tensor]]]
STAGE_SLABS = 3    # one stage being read, one computed, one written
CHUNK_SLABS = 3


def _rewrite(ckpt: Checkpoint, out_dir: Path, layer_fn: LayerFn, verifier: StreamVerifier | None,
             stamp: dict | None, progress: Progress | None,
             checked: Callable[[int], set[str]] | None = None,
             final_fn: FinalFn | None = None) -> tuple[list[dict], dict | None]:
    """Stream ckpt into out_dir with layer_fn applied to each decoder layer.

    ``checked(layer)``: roles that layer_fn itself refuses NaN and Inf in (so they are
    not scanned twice). ``final_fn``: applied to the final stage (final norm and head);
    the head is read once more for its statistics, then scaled block by block as written.

    Threads: one reads the next stage, one writes the previous one, and (when verifying)
    one runs the reference model's layer beside the balancing; the scales are applied in
    place once the reference is done, then the transformed layer runs. The next layer's
    reference step is queued before this layer's scales go in, so the reference thread
    goes from layer to layer without waiting for the apply (both cores stay busy).
    Stages live in ``STAGE_SLABS`` reused slabs, so memory is a few layers whatever the
    model size.
    """
    # a transformed shard's data starts where the source's does modulo the page size, so its
    # tensors go from disk to slab to disk by direct I/O; undo (no stamp) writes the
    # original header back byte for byte
    writers = {name: ShardWriter(out_dir / name, shard, shard_metadata(shard.metadata, stamp),
                                 page_like_source=stamp is not None)
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
            reader = _Lookahead(_read_stages(stages, slabs, align=lambda n: writer_of(n).offset(n)))
            early: dict[int, tuple] = {}   # layer -> (tensors, reference future), started ahead

            def start_reference(stage: Stage) -> tuple:
                """The reference model's layer (and the NaN check) in the reference thread."""
                tensors = stage.tensors(ckpt)
                skip = checked(stage.layer) if checked else frozenset()
                return tensors, verifier.start_layer(tensors, before=lambda: _check_finite(ckpt, stage, tensors, skip))

            def ahead_then(wait: Callable[[], object]) -> Callable[[], object]:
                """Before this layer's scales go in: queue the next layer's reference step, so
                the reference thread never waits for this layer's apply; then wait for ours."""
                def before_apply():
                    nxt = reader.peek()
                    if nxt is not None and nxt.kind == "layer" and nxt.layer not in early:
                        early[nxt.layer] = start_reference(nxt)
                    return wait()
                return before_apply

            for stage in reader:
                tensors = stage.tensors(ckpt)
                new: dict[str, torch.Tensor] = {}
                skip = checked(stage.layer) if checked and stage.kind == "layer" else frozenset()
                candidate = []   # the transformed layer's forward, which must end before the slab is reused
                if stage.kind == "layer" and verifier is not None:
                    # the reference layer (and the NaN check) run beside the balancing; the
                    # transformed layer runs beside the next layer's balancing
                    tensors, ref = early.pop(stage.layer, None) or start_reference(stage)
                    new, report = layer_fn(stage.layer, tensors, ahead_then(ref.result))
                    future = verifier.finish_layer_async(stage.layer, ref, {**tensors, **new})
                    candidate = [(future.result, ())]
                    layer_reports.append({"layer": stage.layer, **report})
                else:
                    _check_finite(ckpt, stage, tensors, skip)
                    if stage.kind == "layer":
                        new, report = layer_fn(stage.layer, tensors, None)
                        layer_reports.append({"layer": stage.layer, **report})
                head_mult = None
                if stage.kind == "final" and final_fn is not None and not ckpt.layout.tie_embeddings:
                    head = stage.names["head"]
                    blocks = lambda: ((start, rows) for start, _, rows in ckpt.row_chunks(head))  # noqa: E731
                    new, report, mults = final_fn(tensors, blocks, DTYPES[ckpt.tensors[head].dtype])
                    head_mult = mults.get("head")
                    if report:
                        layer_reports.append({"layer": "final", **report})
                # a layer is done with once written; the embed and final stages are still read
                # below (norms, positions), so their slab goes back at the end of the iteration
                release = [(stage.release, ())] if stage.kind == "layer" else []
                queue.put([*((writer_of(stage.names[role]).write,
                              (stage.names[role], to_raw(new[role]) if role in new else raw))
                             for role, raw in stage.raw.items()), *candidate, *release])
                if stage.kind == "final" and verifier is not None:
                    trim_heap()   # the head's blocks and logits: measured 613-645 MiB peak, 620-657 without
                write = not (stage.kind == "final" and ckpt.layout.tie_embeddings)
                if stage.kind != "layer" and (verifier is not None or write):   # embedding / head rows:
                    streams = []   # written (a tied head was, as the embedding) and verified, a block at a time
                    for role in stage.streamed:
                        name = stage.names[role]
                        originals: dict[int, torch.Tensor] = {}
                        edit = None
                        if head_mult is not None and role == "head":
                            def edit(start, rows, mult=head_mult, originals=originals):
                                if verifier is not None:   # the reference model reads the original rows
                                    originals[start] = rows.clone()
                                apply_multiplier_(rows, chunk_multiplier(mult, (start, 0), tuple(rows.shape)))
                        blocks = _stream_big(ckpt, name, writer_of(name) if write else None, queue, chunks,
                                             edit=edit)
                        streams.append((role, ((start, originals.pop(start, r), r) for start, r in blocks)))
                    if verifier is None:
                        for _, rows in streams:
                            for _ in rows:
                                pass
                    else:
                        out = _feed_verifier(verifier, stage.kind, stage.layer, tensors, {**tensors, **new}, streams)
                        result = out if out is not None else result
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


def _feed_verifier(verifier: StreamVerifier, kind: str, layer: int, ta: dict, tb: dict, streams=(),
                   before: Callable[[], object] | None = None):
    """One stage of two models into the verifier: a decoder layer, or the embedding or final
    stage with its streamed rows (``(role, blocks)``, each block ``(start, rows_a, rows_b)``:
    the embedding, Gemma 4's per-layer embedding, the head). The result after the final stage,
    else None. The one place that knows how stages feed the reference forward."""
    if kind == "layer":
        ref = verifier.start_layer(ta, before=before)
        verifier.finish_layer(layer, ref, tb)
        return None
    if kind == "final":
        verifier.final_norm(ta["norm"], tb["norm"], ta, tb)
    for role, rows in streams:
        for start, rows_a, rows_b in rows:
            if role == "embed":
                verifier.embed_rows(start, rows_a, rows_b)
            elif role == "ple_embed":
                verifier.ple_rows(start, rows_a, rows_b)
            else:
                verifier.head_rows(rows_a, rows_b, start)
    if kind == "embed":
        verifier.embed_done(ta, tb)
        return None
    return verifier.result()


def verify_stream(ca: Checkpoint, cb: Checkpoint, verifier: StreamVerifier, progress: Progress | None):
    """Feed both checkpoints' stages to the verifier, in turn, through one reader (A's and
    B's layer in use, the next one read): 3 slabs in all. Returns the verifier's result."""
    result = None
    items = [item for sa, sb in zip(_stages(ca), _stages(cb)) for item in ((ca, sa), (cb, sb))]
    slabs = _stage_pool(items, 3, room_for_blocks=True)
    with _torch_threads(1), ThreadPoolExecutor(1) as ref_pool:
        verifier.pool = ref_pool
        reader = _read_stages(items, slabs)
        for sa in reader:
            sb = next(reader)
            ta, tb = sa.tensors(ca), sb.tensors(cb)
            if sa.kind == "layer":
                _check_finite(cb, sb, tb)
                _feed_verifier(verifier, "layer", sa.layer, ta, tb, before=lambda: _check_finite(ca, sa, ta))
            else:
                _check_finite(ca, sa, ta)
                _check_finite(cb, sb, tb)
                opened = []

                def pair_rows(role):
                    a, b = _stream_big(ca, sa.names[role], stage=sa), _stream_big(cb, sb.names[role], stage=sb)
                    opened.extend((a, b))
                    return ((start, ra, rb) for (start, ra), (_, rb) in zip(a, b))

                try:
                    streams = ((role, pair_rows(role)) for role in sa.streamed)
                    result = _feed_verifier(verifier, sa.kind, sa.layer, ta, tb, streams)
                finally:   # zip leaves the second stream open: hand back its block now
                    for stream in opened:
                        stream.close()
            del ta, tb
            sa.release(), sb.release()
            if progress:
                progress(2 * sum(ca.tensors[n].nbytes for n in sa.names.values()), _stage_label(sa))
    return result


Derive = Callable[[str, str, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def verify_derived(ckpt: Checkpoint, verifier: StreamVerifier, derive: Derive, progress: Progress | None = None):
    """Two models made from one checkpoint, stage by stage: ``derive(role, name, tensor,
    first_row)`` gives the tensor in model A and in model B (a base model with two LoRA
    adapters merged, say). The same walk and reader as ``verify_stream``."""
    result = None
    items = [(ckpt, s) for s in _stages(ckpt)]
    slabs = _stage_pool(items, STAGE_SLABS, room_for_blocks=True)
    with _torch_threads(1), ThreadPoolExecutor(1) as ref_pool:
        verifier.pool = ref_pool
        for stage in _read_stages(items, slabs):
            t = stage.tensors(ckpt)
            _check_finite(ckpt, stage, t)
            pairs = {role: derive(role, stage.names[role], x, 0) for role, x in t.items()}
            ta, tb = {r: p[0] for r, p in pairs.items()}, {r: p[1] for r, p in pairs.items()}
            streams = ()
            if stage.kind != "layer":
                streams = ((role, ((start, *derive(role, stage.names[role], r, start))
                                   for start, r in _stream_big(ckpt, stage.names[role], stage=stage)))
                           for role in stage.streamed)
            out = _feed_verifier(verifier, stage.kind, stage.layer, ta, tb, streams)
            result = out if out is not None else result
            del t, ta, tb, pairs
            stage.release()
            if progress:
                progress(sum(ckpt.tensors[n].nbytes for n in stage.names.values()), _stage_label(stage))
    return result
