"""The math of one pair: unit norms, balancing scales, and applying them. Pure functions.

For a unit with A-part ``A_u`` (times s) and B-part ``B_u`` (times 1/s), balancing picks
``s = sqrt(||B_u|| / ||A_u||)`` so that ``||s A_u|| = ||B_u / s||``: the minimum of
``||s A_u||^2 + ||B_u / s||^2``. ``strength`` raises s to a power in [0, 1]; ``pow2``
rounds s to a power of two, which makes the transform exact in IEEE floating point.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .pairs import Member, Pair

from .options import NORMS  # noqa: F401 - re-exported


@dataclass
class UnitStats:
    """Per-unit sums over the A side (times s) and the B side (times 1/s)."""

    sumsq_a: torch.Tensor    # float64 [n]
    sumsq_b: torch.Tensor
    count_a: torch.Tensor    # elements per unit
    count_b: torch.Tensor
    maxabs_a: torch.Tensor   # for the overflow / subnormal limits
    maxabs_b: torch.Tensor
    minabs_a: torch.Tensor   # smallest non-zero |value|
    minabs_b: torch.Tensor

    def norms(self, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.sumsq_a.sqrt(), self.sumsq_b.sqrt()
        if norm == "rms":
            a, b = a / self.count_a.clamp(min=1).sqrt(), b / self.count_b.clamp(min=1).sqrt()
        return a, b

    def dead(self) -> torch.Tensor:
        return (self.sumsq_a == 0) | (self.sumsq_b == 0)


CHUNK_ELEMENTS = 1 << 18   # a chunk's float32 copy (1 MiB) stays in cache
_scratch = threading.local()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread reusable buffer: fresh memory costs a page fault per 4 KiB."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty(max(n, CHUNK_ELEMENTS), dtype=dtype)
    return buf[:n]


PARALLEL_MIN = 1 << 22     # tensors at least this big are reduced in two halves at once
_helper = None


def _helper_pool():
    """One extra thread: a big tensor's second half is reduced there while the caller
    reduces the first (torch ops on cache-sized chunks are too small to split inside)."""
    global _helper
    if _helper is None:
        from concurrent.futures import ThreadPoolExecutor
        _helper = ThreadPoolExecutor(1, thread_name_prefix="wisca-stats")
    return _helper


def _slice_reduce(t: torch.Tensor, axis: int):
    """Per-slice sum of squares, element count, max |x| and min non-zero |x| along ``axis``.

    One pass over the tensor in cache-sized row chunks; NaN or Inf show up in max |x|.
    Big tensors are split by rows into two halves reduced on two threads; the halves'
    results combine exactly (per-row results are disjoint; per-column sums of squares
    add in float64 from float32 partial sums, as the chunks do).
    """
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    if t.numel() < PARALLEL_MIN or t.shape[0] < 2:
        return _slice_reduce_rows(t, axis)
    half = t.shape[0] // 2
    other = _helper_pool().submit(_slice_reduce_rows, t[half:], axis)
    first = _slice_reduce_rows(t[:half], axis)
    second = other.result()
    if axis == 0:
        return (torch.cat([first[0], second[0]]), first[1], torch.cat([first[2], second[2]]),
                torch.cat([first[3], second[3]]))
    return (first[0] + second[0], first[1] + second[1], torch.maximum(first[2], second[2]),
            torch.minimum(first[3], second[3]))


def _slice_reduce_rows(t: torch.Tensor, axis: int):
    rows_axis = axis == 0
    n = t.shape[0] if rows_axis else t.shape[1]
    width = max(t.shape[1], 1)
    sumsq = torch.zeros(n, dtype=torch.float64)
    maxabs = torch.zeros(n, dtype=torch.float64)
    minabs = torch.full((n,), torch.inf, dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // width)
    dim = 1 if rows_axis else 0
    for start in range(0, t.shape[0], step):
        chunk = t[start:start + step]
        x = _chunk_buffer(chunk.numel(), _compute_dtype(t)).view(chunk.shape)
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


class NonFiniteValues(ValueError):
    """A member tensor holds NaN or Inf (found by the statistics pass, which sees every value)."""

    def __init__(self, role: str):
        super().__init__(role)
        self.role = role


def unit_stats(pair: Pair, tensors: dict[str, torch.Tensor]) -> UnitStats:
    """Per-unit statistics of a pair; raises ``NonFiniteValues`` naming a member's role if
    it holds NaN or Inf (max |x| propagates both)."""
    n = pair.n_units
    z = lambda fill=0.0: torch.full((n,), fill, dtype=torch.float64)  # noqa: E731
    s = {+1: [z(), z(), z(), z(torch.inf)], -1: [z(), z(), z(), z(torch.inf)]}
    for m in pair.members:
        t = tensors[m.role]
        if m.offset:   # a (offset + w) norm: the factor the network uses is what scales
            t = t.double() + m.offset
        sumsq, count, maxabs, minabs = _slice_reduce(t, m.axis)
        if not bool(torch.isfinite(maxabs).all()):
            raise NonFiniteValues(m.role)
        keep = m.units >= 0
        idx = m.units[keep]
        acc = s[m.side]
        if m.counts:
            acc[0].index_add_(0, idx, sumsq[keep])
            acc[1].index_add_(0, idx, torch.full((len(idx),), float(count), dtype=torch.float64))
        acc[2].scatter_reduce_(0, idx, maxabs[keep], "amax")
        acc[3].scatter_reduce_(0, idx, minabs[keep], "amin")
    a, b = s[+1], s[-1]
    return UnitStats(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3])


def log2_imbalance(stats: UnitStats, norm: str) -> torch.Tensor:
    """log2(||A_u|| / ||B_u||) per unit; NaN where a side is all zeros."""
    a, b = stats.norms(norm)
    out = torch.log2(a / b)
    return torch.where(stats.dead(), torch.nan, out)


def balancing_scales(stats: UnitStats, norm: str = "fro", strength: float = 1.0) -> torch.Tensor:
    """s = (||B_u|| / ||A_u||) ** (strength / 2); 1 where a unit is dead."""
    a, b = stats.norms(norm)
    s = (b / a) ** (0.5 * strength)
    return torch.where(stats.dead() | ~torch.isfinite(s), torch.ones_like(s), s)


def safe_range(stats: UnitStats, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit [lo, hi] for s so no value overflows or loses bits to the subnormal range.

    A-values are multiplied by s, B-values divided by it. 1 is always inside the range.
    """
    info = torch.finfo(dtype)
    big, tiny = float(info.max), float(info.tiny)
    one = torch.ones_like(stats.maxabs_a)
    lo = torch.maximum(torch.minimum(tiny / stats.minabs_a, one), stats.maxabs_b / big)
    hi = torch.minimum(big / stats.maxabs_a.clamp(min=tiny), torch.maximum(stats.minabs_b / tiny, one))
    # Stay one binade inside the limits: headroom for the max and no rounding at the edge.
    return torch.minimum(lo * 2, one), torch.maximum(hi / 2, one)


def round_pow2(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Nearest power of two to s, kept inside [lo, hi] (which contains 1)."""
    e = torch.round(torch.log2(s))
    e = torch.minimum(e, torch.floor(torch.log2(hi)))
    e = torch.maximum(e, torch.ceil(torch.log2(lo)))
    return torch.exp2(e)


def scale_vector(member: Member, s: torch.Tensor, size: int) -> torch.Tensor:
    """Multiplier for every slice of a member tensor along its axis."""
    vec = torch.ones(size, dtype=torch.float64)
    keep = member.units >= 0
    vec[keep] = s[member.units[keep]] ** member.side
    return vec


def member_multipliers(pair: Pair, s: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """role -> float64 multiplier S, broadcastable to the tensor, such that W' = S * W."""
    out = {}
    for m in pair.members:
        shape = [1] * len(shapes[m.role])
        shape[m.axis] = -1
        mult = scale_vector(m, s, shapes[m.role][m.axis]).view(shape)
        out[m.role] = out[m.role] * mult if m.role in out else mult
    return out


def _exact_in(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every value is a power of two that ``dtype`` represents as a normal number."""
    info = torch.finfo(dtype)
    mant, _ = torch.frexp(values)
    return bool(((mant == 0.5) & (values >= info.tiny) & (values <= info.max)).all())


def scale_tensor(t: torch.Tensor, axis: int, vec: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """t with each slice along ``axis`` multiplied by ``vec`` (float64), rounded once.

    Powers of two multiply in the tensor's own dtype, which is exact; other scales are
    applied in float32 (float64 for float64 tensors) and rounded once to the dtype.
    """
    shape = [1] * t.dim()
    shape[axis] = -1
    if _exact_in(vec, t.dtype):
        return t.mul_(vec.to(t.dtype).view(shape)) if inplace else t * vec.to(t.dtype).view(shape)
    compute = _compute_dtype(t)
    out = t if inplace else torch.empty_like(t)
    v = vec.to(compute).view(shape)
    step = max(1, CHUNK_ELEMENTS // max(t[0].numel(), 1)) if t.dim() > 1 else t.shape[0]
    for start in range(0, t.shape[0], step):
        vs = v[start:start + step] if axis == 0 else v
        out[start:start + step] = (t[start:start + step].to(compute) * vs).to(t.dtype)
    return out


def apply_scales(pair: Pair, tensors: dict[str, torch.Tensor], s: torch.Tensor,
                 inplace: bool = False) -> dict[str, torch.Tensor]:
    """New tensors for the pair's members: A slices times s, B slices times 1/s.

    With power-of-two s no rounding happens at all. ``inplace`` overwrites the inputs.
    Members on one tensor (a fused tensor's parts) combine into one multiplier per axis;
    a ``(offset + w)`` norm stores ``(offset + w) * s - offset``, which rounds.
    """
    groups: dict[tuple[str, int], list[Member]] = {}
    for m in pair.members:
        groups.setdefault((m.role, m.axis), []).append(m)
    out: dict[str, torch.Tensor] = {}
    for (role, axis), members in groups.items():
        t = out.get(role, tensors[role])
        vec = torch.ones(t.shape[axis], dtype=torch.float64)
        for m in members:
            vec *= scale_vector(m, s, t.shape[axis])
        if members[0].offset:
            shape = [1] * t.dim()
            shape[axis] = -1
            off = members[0].offset
            out[role] = ((t.double() + off) * vec.view(shape) - off).to(t.dtype)
        else:
            out[role] = scale_tensor(t, axis, vec, inplace or role in out)
    return out


@dataclass
class PairResult:
    kind: str
    scales: torch.Tensor         # float32 [n_units], the multipliers applied (A side)
    before: torch.Tensor         # log2 imbalance per unit before
    after: torch.Tensor          # and after (analytic, from the norms and the scales)
    dead: int
    clamped: int


def solve_pair(pair: Pair, tensors: dict[str, torch.Tensor], norm: str = "fro",
               strength: float = 1.0, pow2: bool = True,
               dtype: torch.dtype = torch.float32) -> PairResult:
    """Balancing scales for one pair, limited to the range that ``dtype`` keeps exact."""
    stats = unit_stats(pair, tensors)
    s = balancing_scales(stats, norm, strength)
    lo, hi = safe_range(stats, dtype)
    if pow2:
        final = round_pow2(s, lo, hi)
    else:
        final = torch.minimum(torch.maximum(s, lo), hi)
    ideal = torch.exp2(torch.round(torch.log2(s))) if pow2 else s
    clamped = int((final != ideal).sum())
    final = final.to(torch.float32).double()  # the scales as stored and applied
    before = log2_imbalance(stats, norm)
    return PairResult(pair.kind, final.float(), before, before + 2 * torch.log2(final),
                      int(stats.dead().sum()), clamped)
