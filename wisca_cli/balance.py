"""The math of one pair: unit norms, balancing scales, and applying them. Pure functions.

For a unit with A-part ``A_u`` (times s) and B-part ``B_u`` (times 1/s), balancing picks
``s = sqrt(||B_u|| / ||A_u||)`` so that ``||s A_u|| = ||B_u / s||``: the minimum of
``||s A_u||^2 + ||B_u / s||^2``. ``strength`` raises s to a power in [0, 1]; ``pow2``
rounds s to a power of two, which makes the transform exact in IEEE floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pairs import Member, Pair

NORMS = ("fro", "rms")


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


def _other_dims(t: torch.Tensor, axis: int) -> list[int]:
    return [d for d in range(t.dim()) if d != axis]


def _slice_reduce(t: torch.Tensor, axis: int):
    """Per-slice sum of squares, element count, max |x| and min non-zero |x| along ``axis``."""
    x = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    dims = _other_dims(x, axis)
    a = x.abs()
    if dims:
        sumsq = (x * x).sum(dims, dtype=torch.float64)
        maxabs = a.amax(dims)
        minabs = torch.where(a > 0, a, torch.inf).amin(dims)
    else:
        sumsq, maxabs, minabs = (x * x).double(), a, torch.where(a > 0, a, torch.inf)
    count = x.numel() // max(x.shape[axis], 1)
    return sumsq, count, maxabs.double(), minabs.double()


def unit_stats(pair: Pair, tensors: dict[str, torch.Tensor]) -> UnitStats:
    n = pair.n_units
    z = lambda fill=0.0: torch.full((n,), fill, dtype=torch.float64)  # noqa: E731
    s = {+1: [z(), z(), z(), z(torch.inf)], -1: [z(), z(), z(), z(torch.inf)]}
    for m in pair.members:
        sumsq, count, maxabs, minabs = _slice_reduce(tensors[m.role], m.axis)
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
        out[m.role] = scale_vector(m, s, shapes[m.role][m.axis]).view(shape)
    return out


def apply_scales(pair: Pair, tensors: dict[str, torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
    """New tensors for the pair's members: A slices times s, B slices times 1/s.

    The product is taken in float32 (float64 for float64 tensors) and rounded once to the
    tensor's dtype; with power-of-two s no rounding happens at all.
    """
    out = {}
    for m in pair.members:
        t = tensors[m.role]
        compute = torch.float64 if t.dtype == torch.float64 else torch.float32
        vec = scale_vector(m, s, t.shape[m.axis]).to(compute)
        shape = [1] * t.dim()
        shape[m.axis] = -1
        out[m.role] = (t.to(compute) * vec.view(shape)).to(t.dtype)
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
