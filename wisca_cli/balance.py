"""The math of one pair: unit norms, balancing scales, and applying them. Pure functions.

For a unit with A-part ``A_u`` (times s) and B-part ``B_u`` (times 1/s), balancing picks
``s = sqrt(||B_u|| / ||A_u||)`` so that ``||s A_u|| = ||B_u / s||``: the minimum of
``||s A_u||^2 + ||B_u / s||^2`` (a B side divided by ``s**d``, a relu² MLP's down with d = 2:
``s = (||B_u|| / ||A_u||) ** (1 / (1 + d))``). ``strength`` raises s to a power in [0, 1]; ``pow2``
rounds s to a power of two, which makes the transform exact in IEEE floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp8
from .options import NORMS  # noqa: F401 - re-exported
from .pairs import Member, Pair
from .stats import (CHUNK_ELEMENTS, NonFiniteValues, SliceReduce, UnitStats, _compute_dtype,  # noqa: F401 - re-exported
                    slice_reduce, unit_stats)


def log2_imbalance(stats: UnitStats, norm: str) -> torch.Tensor:
    """log2(||A_u|| / ||B_u||) per unit; NaN where a side is all zeros."""
    a, b = stats.norms(norm)
    out = torch.log2(a / b)
    return torch.where(stats.dead(), torch.nan, out)


def balancing_scales(stats: UnitStats, norm: str = "fro", strength: float = 1.0, degree: int = 1) -> torch.Tensor:
    """s = (||B_u|| / ||A_u||) ** (strength / (1 + degree)); 1 where a unit is dead. ``degree``:
    the B side's power of 1/s (2 for a relu² MLP), so that ||s A_u|| = ||B_u / s**degree||."""
    a, b = stats.norms(norm)
    s = (b / a) ** (strength / (1 + degree))
    return torch.where(stats.dead() | ~torch.isfinite(s), torch.ones_like(s), s)


def safe_range(stats: UnitStats, dtype: torch.dtype, degree: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit [lo, hi] for s so no value overflows or loses bits to the subnormal range.

    A-values are multiplied by s, B-values divided by s ** degree. 1 is always inside the range.
    """
    info = torch.finfo(dtype)
    big, tiny = float(info.max), float(info.tiny)
    one = torch.ones_like(stats.maxabs_a)
    root = 1.0 / degree
    lo = torch.maximum(torch.minimum(tiny / stats.minabs_a, one), (stats.maxabs_b / big) ** root)
    hi = torch.minimum(big / stats.maxabs_a.clamp(min=tiny), torch.maximum((stats.minabs_b / tiny) ** root, one))
    # Stay one binade inside the limits: headroom for the max and no rounding at the edge.
    return torch.minimum(lo * 2, one), torch.maximum(hi / 2, one)


def round_pow2(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Nearest power of two to s, kept inside [lo, hi] (which contains 1)."""
    e = torch.round(torch.log2(s))
    e = torch.minimum(e, torch.floor(torch.log2(hi)))
    e = torch.maximum(e, torch.ceil(torch.log2(lo)))
    return torch.exp2(e)


def scale_vector(member: Member, s: torch.Tensor, size: int) -> torch.Tensor:
    """Multiplier for every slice of a member tensor along its axis (``[experts, size]``
    for a member with a leading expert dim)."""
    vec = torch.ones(member.units.shape[:-1] + (size,), dtype=torch.float64)
    keep = member.units >= 0
    vec[keep] = s[member.units[keep]] ** member.side
    return vec


def _multiplier(member: Member, s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The member's multiplier, broadcastable to a tensor of ``shape``."""
    view = [1] * len(shape)
    view[member.axis] = -1
    if member.units.dim() == 2:
        view[0] = shape[0]
    return scale_vector(member, s, shape[member.axis]).view(view)


def member_multipliers(pair: Pair, s: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """role -> float64 multiplier S, broadcastable to the tensor, such that W' = S * W."""
    out = {}
    for m in pair.members:
        mult = _multiplier(m, s, tuple(shapes[m.role]))
        out[m.role] = out[m.role] * mult if m.role in out else mult
    return out


def chunk_multiplier(mult: torch.Tensor, offsets: tuple[int, ...], shape: tuple[int, ...],
                     power: int = 1) -> torch.Tensor:
    """The multiplier of one piece of a tensor: ``mult`` (broadcastable to the whole tensor,
    from ``member_multipliers``) restricted to the box at ``offsets`` of size ``shape``,
    to the power ``power``: 1 for weights (W' = S W), -1 for gradients, Adam's exp_avg and
    SGD momentum, -2 for exp_avg_sq and Adagrad's sum."""
    view = mult
    for d, (start, n) in enumerate(zip(offsets, shape)):
        if view.shape[d] != 1:
            view = view.narrow(d, start, n)
    return view.double() ** power


def apply_multiplier(t: torch.Tensor, mult: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``t * mult**power`` rounded once to t's dtype (a negative power divides by
    ``mult**-power``). Powers of two compute in t's own dtype, which is exact barring
    underflow; other multipliers in float64, one row block at a time. ``mult`` broadcasts
    to t (a whole tensor's, or a piece's from ``chunk_multiplier``)."""
    _no_fp8(t)
    factor = mult.double() ** abs(power)
    divide = power < 0
    if _exact_in(factor, t.dtype):
        f = factor.to(t.dtype)
        return t / f if divide else t * f
    if t.dim() == 0:
        return ((t.double() / factor) if divide else (t.double() * factor)).to(t.dtype)
    out = torch.empty_like(t)
    f = torch.broadcast_to(factor, t.shape)
    step = max(1, (1 << 20) // max(t[0].numel(), 1))
    for i in range(0, t.shape[0], step):
        rows = t[i:i + step].double()
        out[i:i + step] = ((rows / f[i:i + step]) if divide else (rows * f[i:i + step])).to(t.dtype)
    return out


def apply_multiplier_(t: torch.Tensor, mult: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``apply_multiplier`` in place: powers of two multiply the storage directly (no copy,
    no temporary the size of t); other multipliers compute and copy back."""
    _no_fp8(t)
    factor = mult.double() ** abs(power)
    if _exact_in(factor, t.dtype):
        f = factor.to(t.dtype)
        return t.div_(f) if power < 0 else t.mul_(f)
    return t.copy_(apply_multiplier(t, mult, power))


def _no_fp8(t: torch.Tensor) -> None:
    """FP8 codes are scaled by ``fp8.scale_codes`` only (torch's own float8 product saturates)."""
    if fp8.is_fp8(t):
        raise ValueError("FP8 codes are scaled per row or column (fp8.scale_codes), not by a multiplier")


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
    if fp8.is_fp8(t):   # FP8 codes: powers of two only, every value checked
        return fp8.scale_codes(t, axis, vec, inplace)
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
                 inplace: bool = False, extra: dict[tuple[str, int], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """New tensors for the pair's members: A slices times s, B slices times 1/s.

    With power-of-two s no rounding happens at all. ``inplace`` overwrites the inputs.
    Members on one tensor (a fused tensor's parts) combine into one multiplier per axis;
    a ``(offset + w)`` norm stores ``(offset + w) * s - offset``, which rounds. ``extra``:
    (role, axis) -> one more per-slice factor multiplied in (FP8 codes' folds: ``fp8.fold_vector``),
    applied in the same step.
    """
    groups: dict[tuple[str, int], list[Member]] = {}
    for m in pair.members:
        groups.setdefault((m.role, m.axis), []).append(m)
    out: dict[str, torch.Tensor] = {}
    for (role, axis), members in groups.items():
        t = out.get(role, tensors[role])
        if members[0].units.dim() == 2:   # a fused 3-D expert tensor: per expert and slice
            mult = torch.ones(1, dtype=torch.float64)
            for m in members:
                mult = mult * _multiplier(m, s, tuple(t.shape))
            inplace_here = inplace or role in out
            out[role] = apply_multiplier_(t, mult) if inplace_here else apply_multiplier(t, mult)
            continue
        vec = torch.ones(t.shape[axis], dtype=torch.float64)
        for m in members:
            vec *= scale_vector(m, s, t.shape[axis])
        if extra and (role, axis) in extra:
            vec *= extra[(role, axis)]
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
    fp8_clamped: int | None = None   # units whose scale the FP8 codes limited (None: no FP8 tensor)
    fp8_folds: dict | None = None    # (FP8 role, axis) -> int64 b per block moved into its scale_inv


def solve_pair(pair: Pair, tensors: dict[str, torch.Tensor], norm: str = "fro",
               strength: float = 1.0, pow2: bool = True,
               dtype: torch.dtype = torch.float32, reduce: SliceReduce = slice_reduce) -> PairResult:
    """Balancing scales for one pair, limited to the range that ``dtype`` keeps exact."""
    return scales_from_stats(pair.kind, unit_stats(pair, tensors, reduce), norm, strength, pow2, dtype,
                             degree=pair.b_degree)


def scales_from_stats(kind: str, stats: UnitStats, norm: str = "fro", strength: float = 1.0, pow2: bool = True,
                      dtype: torch.dtype = torch.float32,
                      limits: tuple[torch.Tensor, torch.Tensor] | None = None, degree: int = 1) -> PairResult:
    """Balancing scales from (reduced) statistics: what every backend calls once its
    chunks', files' or ranks' partial statistics are merged. ``limits``: more per-unit
    bounds [lo, hi] on s (powers of two around 1: ``fp8.unit_limits``, what keeps FP8 codes
    exact); the units they change are counted as ``fp8_clamped`` (and as ``clamped``). ``degree``:
    the pair's ``b_degree``."""
    s = balancing_scales(stats, norm, strength, degree)
    lo, hi = safe_range(stats, dtype, degree)
    fp8_clamped = None
    if pow2:
        final = round_pow2(s, lo, hi)
        if limits is not None:
            unlimited = final
            final = round_pow2(s, torch.maximum(lo, limits[0]), torch.minimum(hi, limits[1]))
            fp8_clamped = int((final != unlimited).sum())
    else:
        if limits is not None:
            raise ValueError("FP8 codes take power-of-two scales only")
        final = torch.minimum(torch.maximum(s, lo), hi)
    ideal = torch.exp2(torch.round(torch.log2(s))) if pow2 else s
    clamped = int((final != ideal).sum())
    final = final.to(torch.float32).double()  # the scales as stored and applied
    before = log2_imbalance(stats, norm)
    return PairResult(kind, final.float(), before, before + (1 + degree) * torch.log2(final),
                      int(stats.dead().sum()), clamped, fp8_clamped)
