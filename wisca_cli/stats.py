"""Per-unit statistics as mergeable partial sums. Pure: no I/O, no threads.

A unit's balancing needs only the sums of squares of its A side and its B side (plus
element counts for the RMS norm, and max / min non-zero |x| for the overflow and
subnormal limits and the NaN/Inf check). All of them combine across pieces of a
tensor: sums and counts add, maxima and minima take the max and min. So any piece of a
member tensor, wherever it lives (a row block of a safetensors tensor, a DCP chunk, the
local shard of a DTensor), gives its contribution with ``chunk_stats``, and the pieces
reduce in any order (``UnitStats.merge``, or ``pack`` / ``unpack`` around
``torch.distributed.all_reduce``). Everything accumulates in float64.

    stats = UnitStats.zeros(pair.n_units)
    for member in pair.members:
        for chunk, offsets in pieces_of(member.role):
            stats = stats.merge(chunk_stats(member, pair.n_units, chunk, offsets))
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from . import fp8
from .pairs import Member, Pair

CHUNK_ELEMENTS = 1 << 18   # a chunk's float32 copy (1 MiB) stays in cache


@dataclass
class UnitStats:
    """Per-unit sums over the A side (times s) and the B side (times 1/s), float64 [n]."""

    sumsq_a: torch.Tensor
    sumsq_b: torch.Tensor
    count_a: torch.Tensor    # elements per unit
    count_b: torch.Tensor
    maxabs_a: torch.Tensor   # for the overflow / subnormal limits (NaN / Inf propagate)
    maxabs_b: torch.Tensor
    minabs_a: torch.Tensor   # smallest non-zero |value| (inf: none)
    minabs_b: torch.Tensor

    SUMS = ("sumsq_a", "sumsq_b", "count_a", "count_b")
    MAXES = ("maxabs_a", "maxabs_b")
    MINS = ("minabs_a", "minabs_b")

    @classmethod
    def zeros(cls, n: int) -> "UnitStats":
        z = lambda fill=0.0: torch.full((n,), fill, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), z(), z(torch.inf), z(torch.inf))

    def merge(self, other: "UnitStats") -> "UnitStats":
        """The statistics of both pieces together (associative and commutative)."""
        out = {f: getattr(self, f) + getattr(other, f) for f in self.SUMS}
        out.update({f: torch.maximum(getattr(self, f), getattr(other, f)) for f in self.MAXES})
        out.update({f: torch.minimum(getattr(self, f), getattr(other, f)) for f in self.MINS})
        return UnitStats(**out)

    __add__ = merge

    def pack(self) -> dict[str, torch.Tensor]:
        """Three float64 tensors to reduce with SUM, MAX and MIN (``torch.distributed``)."""
        return {"sum": torch.stack([getattr(self, f) for f in self.SUMS]),
                "max": torch.stack([getattr(self, f) for f in self.MAXES]),
                "min": torch.stack([getattr(self, f) for f in self.MINS])}

    @classmethod
    def unpack(cls, packed: dict[str, torch.Tensor]) -> "UnitStats":
        values = dict(zip(cls.SUMS, packed["sum"])) | dict(zip(cls.MAXES, packed["max"])) | \
            dict(zip(cls.MINS, packed["min"]))
        return cls(**{f.name: values[f.name].clone() for f in fields(cls)})

    def norms(self, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.sumsq_a.sqrt(), self.sumsq_b.sqrt()
        if norm == "rms":
            a, b = a / self.count_a.clamp(min=1).sqrt(), b / self.count_b.clamp(min=1).sqrt()
        return a, b

    def dead(self) -> torch.Tensor:
        return (self.sumsq_a == 0) | (self.sumsq_b == 0)


class NonFiniteValues(ValueError):
    """A member tensor holds NaN or Inf (found by the statistics pass, which sees every value)."""

    def __init__(self, role: str):
        super().__init__(role)
        self.role = role


SliceReduce = Callable[[torch.Tensor, int], tuple]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def slice_reduce(t: torch.Tensor, axis: int, scratch: torch.Tensor | None = None):
    """Per-slice sum of squares, element count, max |x| and min non-zero |x| along ``axis``
    of a 2-D view of ``t`` (rows: axis 0; columns: axis 1).

    One pass in cache-sized row chunks, each copied into one reused float32 buffer
    (``scratch``, or one allocated here); per-row sums are float32, accumulated in float64.
    NaN or Inf show up in max |x|.
    """
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    rows_axis = axis == 0
    n = t.shape[0] if rows_axis else t.shape[1]
    width = max(t.shape[1], 1)
    sumsq = torch.zeros(n, dtype=torch.float64)
    maxabs = torch.zeros(n, dtype=torch.float64)
    minabs = torch.full((n,), torch.inf, dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // width)
    dim = 1 if rows_axis else 0
    compute = _compute_dtype(t)
    need = min(step, t.shape[0]) * width
    if scratch is None or scratch.numel() < need or scratch.dtype != compute:
        scratch = torch.empty(max(need, 1), dtype=compute)
    for start in range(0, t.shape[0], step):
        chunk = t[start:start + step]
        x = scratch[:chunk.numel()].view(chunk.shape)
        x.copy_(chunk)
        ss = (torch.linalg.vector_norm(x, dim=1).square() if rows_axis else (x * x).sum(0)).double()
        x.abs_()
        mx, mn = x.amax(dim).double(), x.amin(dim).double()
        if bool((mn == 0).any()):            # zeros present: min over the non-zero values only
            mn = torch.where(x > 0, x, torch.inf).amin(dim).double()
        if rows_axis:
            sumsq[start:start + step], maxabs[start:start + step], minabs[start:start + step] = ss, mx, mn
        else:
            sumsq += ss
            torch.maximum(maxabs, mx, out=maxabs)
            torch.minimum(minabs, mn, out=minabs)
    return sumsq, t.numel() // max(n, 1), maxabs, minabs


def chunk_stats(member: Member, n_units: int, chunk: torch.Tensor, offsets: tuple[int, ...] | None = None,
                reduce: SliceReduce = slice_reduce, into: UnitStats | None = None) -> UnitStats:
    """The contribution of one piece of a member tensor to every unit's statistics.

    ``offsets``: the piece's start in the whole tensor, per dimension (None: the whole
    tensor). Only the offset along ``member.axis`` places the slices in units; pieces
    along the other dimensions contribute partial sums of the same slices. Raises
    ``NonFiniteValues`` naming the member's role if the piece holds NaN or Inf. ``into``:
    accumulate into these statistics in place (and return them).
    """
    out = UnitStats.zeros(n_units) if into is None else into
    if member.units.dim() == 2:   # dim 0 holds the experts: each expert's slices on their own
        first = offsets[0] if offsets else 0
        for e in range(chunk.shape[0]):
            one = Member(member.role, member.axis - 1, member.units[first + e], member.side, member.counts)
            chunk_stats(one, n_units, chunk[e], offsets[1:] if offsets else None, reduce, into=out)
        return out
    t = chunk.double() + member.offset if member.offset else chunk   # a (offset + w) norm: the factor scales
    sumsq, count, maxabs, minabs = reduce(t, member.axis)
    if not bool(torch.isfinite(maxabs).all()):
        raise NonFiniteValues(member.role)
    start = offsets[member.axis] if offsets else 0
    units = member.units[start:start + len(sumsq)]
    keep = units >= 0
    idx = units[keep]
    a = member.side > 0
    if member.counts:
        getattr(out, "sumsq_a" if a else "sumsq_b").index_add_(0, idx, sumsq[keep])
        getattr(out, "count_a" if a else "count_b").index_add_(
            0, idx, torch.full((len(idx),), float(count), dtype=torch.float64))
    getattr(out, "maxabs_a" if a else "maxabs_b").scatter_reduce_(0, idx, maxabs[keep], "amax")
    getattr(out, "minabs_a" if a else "minabs_b").scatter_reduce_(0, idx, minabs[keep], "amin")
    return out


def unit_stats(pair: Pair, tensors: dict[str, torch.Tensor], reduce: SliceReduce = slice_reduce,
               fp8_block: tuple[int, int] | None = None) -> UnitStats:
    """Per-unit statistics of a pair over whole member tensors (role -> tensor). An FP8
    member (float8_e4m3fn codes, its ``<role>_scale_inv`` in ``tensors``, ``fp8_block`` the
    checkpoint's weight_block_size) counts with its dequantised values, the weight the model
    computes with, fed a few blocks of rows at a time."""
    stats = UnitStats.zeros(pair.n_units)
    for m in pair.members:
        t = tensors[m.role]
        if fp8.is_fp8(t):
            if fp8.nan_codes(t):
                raise NonFiniteValues(m.role)
            for start, rows in fp8.dequantized_rows(t, tensors[m.role + fp8.SCALE_SUFFIX], fp8_block):
                chunk_stats(m, pair.n_units, rows, (start, 0), reduce, into=stats)
        else:
            chunk_stats(m, pair.n_units, t, None, reduce, into=stats)
    return stats
