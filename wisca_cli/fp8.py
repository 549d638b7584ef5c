"""FP8 block-quantised linear weights (DeepSeek-V3 / Kimi K2 as released): the math wisca
needs to rescale them in their own format.

A quantised weight ``X.weight`` is float8_e4m3fn ``[out, in]`` with a float32
``X.weight_scale_inv`` ``[ceil(out / bm), ceil(in / bn)]`` (``weight_block_size`` [bm, bn]);
the weight the model computes with is ``code[r, c] * scale_inv[r // bm, c // bn]``, in float32,
then cast to the model's dtype (transformers' ``_dequantize_fp8_weight``; its loader's
``Fp8Dequantize`` gives the same wherever the blocks divide the shape, and refuses a partial
last block, which DeepSeek-V3's ``kv_a_proj_with_mqa`` [576, 7168] has). A power of two ``2**k`` on a
row or column of the codes scales the dequantised weight by exactly ``2**k`` (the float32
product only changes exponent), so the transform is exact as long as every scaled code is
again an e4m3fn value: ``|v| 2**k <= 448``, and a value written ``M 2**q`` (M odd) needs
``q + k >= -9`` (the subnormal step). ``exponent_limits`` gives, per row or column, the k that
keep every code exact; ``unit_exponents`` intersects them over a pair's members (both sides);
``scale_codes`` applies the scales and checks every value (``Fp8NotExact`` on any rounding: a bug, never written).

Folds: the codes' limits bind hard (most 7168-wide rows hold a code whose last bit is 2**-9), so
a power of two b per block of rows (or columns) may also move into ``weight_scale_inv``: its
row-block (column-block) times ``2**b``, the block's codes times ``2**-b`` on top of their units'
scales. The dequantised weight and every unit's total scale are unchanged; only the split between
codes and scale_inv moves, and a unit's allowed exponent shifts by b on that member
(``choose_folds``, ``settle_folds``; ``fold_scale_inv`` applies and checks them, undo applies -b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"          # role suffix: ``q_b`` -> ``q_b_scale_inv``
SCALE_NAME = "weight_scale_inv"      # tensor name: ``...q_b_proj.weight`` -> ``...q_b_proj.weight_scale_inv``
MAX = 448.0
LOWEST_EXP = -9                      # the subnormal step: 2 ** -9
UNBOUNDED = 64                       # the limit of an all-zero slice (any k)
CHUNK = 1 << 20                      # elements handled at a time


class Fp8NotExact(RuntimeError):
    """A scaled FP8 code is not an e4m3fn value: the limits were not respected (a bug)."""


def _luts() -> tuple[torch.Tensor, torch.Tensor]:
    """Per 7-bit magnitude code (sign dropped): the largest k with |v| 2**k <= 448, and the
    smallest k with v 2**k still on the e4m3fn grid. 127 is NaN (never asked: the statistics
    refuse it first); 0 is unbounded."""
    kmax, kmin = torch.zeros(128, dtype=torch.int16), torch.zeros(128, dtype=torch.int16)
    for mag in range(128):
        e, m = mag >> 3, mag & 7
        sig, q = (m, LOWEST_EXP) if e == 0 else (8 + m, e - 10)   # value = sig * 2 ** q
        if mag == 0 or mag == 127:
            kmax[mag], kmin[mag] = UNBOUNDED, -UNBOUNDED
            continue
        while sig % 2 == 0:
            sig, q = sig // 2, q + 1
        k = 0
        while sig * 2.0 ** (q + k + 1) <= MAX:
            k += 1
        kmax[mag], kmin[mag] = k, LOWEST_EXP - q
    return kmax, kmin


KMAX, KMIN = _luts()


@dataclass(frozen=True)
class Quantized:
    """An FP8 weight as the reference forward reads it: codes, block scales, block size."""
    codes: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def is_fp8(t) -> bool:
    return getattr(t, "dtype", None) == DTYPE


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``weight_scale_inv``'s shape for a ``[out, in]`` weight."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantized_rows(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     dtype: torch.dtype = torch.float32, rows: int | None = None):
    """Yield (first row, rows) of the dequantised weight, a few blocks of rows at a time (or
    ``rows`` rows): ``code * scale_inv[r // bm, c // bn]`` computed in float32, as transformers
    does, then cast to ``dtype``."""
    bm, bn = block
    out, cols = codes.shape
    step = rows or max(bm, (CHUNK // max(cols, 1)) // bm * bm)
    scale = scale_inv.to(torch.float32).repeat_interleave(bn, dim=1)[:, :cols]
    for start in range(0, out, step):
        n = min(step, out - start)
        s = scale[start // bm:-(-(start + n) // bm)].repeat_interleave(bm, dim=0)[start % bm:start % bm + n]
        yield start, (codes[start:start + n].to(torch.float32) * s).to(dtype)


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole dequantised weight (the reference forward converts row blocks instead)."""
    out = torch.empty(codes.shape, dtype=dtype)
    for start, rows in dequantized_rows(codes, scale_inv, block, dtype):
        out[start:start + len(rows)] = rows
    return out


def exponent_limits(codes: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice along ``axis`` (rows: 0, columns: 1) of a 2-D code tensor: (k_min, k_max),
    int, such that every code of the slice times ``2**k`` is exact for k_min <= k <= k_max
    (k_min <= 0 <= k_max; +-UNBOUNDED for an all-zero slice)."""
    bits = codes.reshape(codes.shape[0], -1).view(torch.uint8)
    n = bits.shape[axis]
    lo = torch.full((n,), -UNBOUNDED, dtype=torch.int16)
    hi = torch.full((n,), UNBOUNDED, dtype=torch.int16)
    step = max(1, CHUNK // max(bits.shape[1], 1))
    for start in range(0, bits.shape[0], step):
        mag = (bits[start:start + step] & 0x7F).long()
        kmax, kmin = KMAX[mag], KMIN[mag]
        if axis == 0:
            hi[start:start + step] = kmax.amin(1)
            lo[start:start + step] = kmin.amax(1)
        else:
            torch.minimum(hi, kmax.amin(0), out=hi)
            torch.maximum(lo, kmin.amax(0), out=lo)
    return lo, hi


def scale_codes(codes: torch.Tensor, axis: int, vec: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Codes with slice i along ``axis`` times ``vec[i]`` (powers of two), each value checked to
    be an e4m3fn value again (``Fp8NotExact`` otherwise: a bug; the run stops, nothing is written)."""
    return scale_codes2(codes, vec if axis == 0 else None, vec if axis == 1 else None, inplace)


def scale_codes2(codes: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None,
                 inplace: bool = False) -> torch.Tensor:
    """Codes times ``rows[r] * cols[c]`` (powers of two; None: ones) in one step, every value
    checked (``Fp8NotExact``). One step matters where a tensor has both row and column scales
    (undo after alternating sweeps): each factor alone may leave the e4m3fn range that their
    product returns to."""
    out = codes if inplace else codes.clone()
    vecs = [v for v in (rows, cols) if v is not None and not bool((v == 1).all())]
    if not vecs:
        return out
    for v in vecs:
        mant, _ = torch.frexp(v)
        if not bool((mant == 0.5).all()):
            raise Fp8NotExact("FP8 codes take power-of-two scales only")
    r = None if rows is None else rows.to(torch.float32).view(-1, 1)
    c = None if cols is None else cols.to(torch.float32).view(1, -1)
    step = max(1, CHUNK // max(codes[0].numel(), 1))
    for start in range(0, codes.shape[0], step):
        x = codes[start:start + step].to(torch.float32)
        if r is not None:
            x.mul_(r[start:start + step])
        if c is not None:
            x.mul_(c)
        y = x.to(DTYPE)
        if not torch.equal(y.to(torch.float32), x):
            raise Fp8NotExact(f"a scaled FP8 code is not an e4m3fn value (rows {start}+)")
        out[start:start + step].view(torch.uint8).copy_(y.view(torch.uint8))
    return out


def nan_codes(codes: torch.Tensor) -> bool:
    """Whether any code is NaN (e4m3fn has no Inf; NaN is S.1111.111)."""
    return bool(((codes.reshape(-1).view(torch.uint8) & 0x7F) == 0x7F).any())


# -- folds: a power of two per block moved into weight_scale_inv ----------------------------
# A block of ``bm`` rows (a row-scaled tensor) or ``bn`` columns (a column-scaled one) may take
# 2**b into its weight_scale_inv row-block or column-block while its codes take 2**-b: the same
# dequantised weight. A unit's code exponent is then its k minus its block's b, so the codes'
# limits bind on that residual: the unit's allowed k shifts by b on that member.
SCALE_EXP = (-125, 128)     # frexp exponents of the normal float32 values (m 2**e, 0.5 <= m < 1)
FOLD_SPAN = 160             # candidate b in [-FOLD_SPAN, FOLD_SPAN]


@dataclass
class Slices:
    """The slices of one FP8 tensor along one axis that a pair scales: per slice the code
    exponent limits (``kmin``, ``kmax``, int64), the unit and side of the member that scales it
    (unit -1: no member, the slice only takes its block's fold), and the block size there."""
    role: str
    axis: int
    size: int
    kmin: torch.Tensor
    kmax: torch.Tensor
    units: torch.Tensor
    sides: torch.Tensor

    @property
    def blocks(self) -> int:
        return -(-len(self.kmin) // self.size)


def pair_slices(members, tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> list[Slices]:
    """One ``Slices`` per FP8 (tensor, axis) that the pair's members scale (members on one
    tensor and axis, a fused tensor's parts, merge); empty when the pair touches no FP8 tensor."""
    groups: dict[tuple[str, int], list] = {}
    for m in members:
        t = tensors[m.role]
        if not is_fp8(t):
            continue
        if m.units.dim() != 1 or t.dim() != 2:
            raise ValueError(f"{m.role}: FP8 weights are read as 2-D [out, in] tensors only")
        groups.setdefault((m.role, m.axis), []).append(m)
    out = []
    for (role, axis), ms in groups.items():
        kmin, kmax = exponent_limits(tensors[role], axis)
        units = torch.full((len(kmin),), -1, dtype=torch.long)
        sides = torch.zeros(len(kmin), dtype=torch.long)
        for m in ms:
            keep = m.units >= 0
            units[keep], sides[keep] = m.units[keep], m.side
        out.append(Slices(role, axis, block[axis], kmin.long(), kmax.long(), units, sides))
    return out


def fold_vector(b: torch.Tensor, size: int, n: int, sign: int = 1) -> torch.Tensor:
    """Per slice (``n`` of them, blocks of ``size``): ``2**(sign * b[block])``, float64."""
    return torch.exp2(sign * b.double()).repeat_interleave(size)[:n]


def unit_exponents(slices: list[Slices], n_units: int, folds: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, [lo, hi] (int64) for its exponent k so that every FP8 code it touches stays
    exact, its slices' codes taking ``side * k - b`` (b: their block's fold, ``folds[(role,
    axis)]`` per block, none: 0). Empty (lo > hi) where the folds disagree."""
    lo = torch.full((n_units,), -UNBOUNDED, dtype=torch.long)
    hi = torch.full((n_units,), UNBOUNDED, dtype=torch.long)
    for s in slices:
        b = (folds or {}).get((s.role, s.axis))
        shift = b.long().repeat_interleave(s.size)[:len(s.kmin)] if b is not None else 0
        kmin, kmax = s.kmin + shift, s.kmax + shift
        kmin, kmax = torch.where(s.sides < 0, -kmax, kmin), torch.where(s.sides < 0, -kmin, kmax)
        keep = s.units >= 0
        lo.scatter_reduce_(0, s.units[keep], kmin[keep], "amax")
        hi.scatter_reduce_(0, s.units[keep], kmax[keep], "amin")
    return lo, hi


def scale_fold_range(scale_inv: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block along ``axis`` (a row of ``scale_inv`` for 0, a column for 1): [lo, hi] (int64)
    for b so that every value of it times ``2**b`` is a normal float32 (exact, and undone
    exactly); 0 always inside."""
    x = scale_inv.to(torch.float32)
    _, e = torch.frexp(x)
    e, nz = e.long(), x != 0
    other = 1 - axis
    emin = torch.where(nz, e, SCALE_EXP[1]).amin(other)
    emax = torch.where(nz, e, SCALE_EXP[0]).amax(other)
    return (SCALE_EXP[0] - emin).clamp(max=0), (SCALE_EXP[1] - emax).clamp(min=0)


def choose_folds(slices: list[Slices], want: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:
    """(role, axis) -> b per block (int64): per block, the b that lets the most of its slices
    take their unit's wanted exponent ``want`` (unlimited, int) exactly (ties: the smallest |b|,
    then the negative one), among those that keep its unscaled slices exact (they take -b) and
    its weight_scale_inv values normal float32. Deterministic."""
    cands = torch.arange(-FOLD_SPAN, FOLD_SPAN + 1)
    width = len(cands)
    out = {}
    for s in slices:
        n, nb = len(s.kmin), s.blocks
        live = s.units >= 0
        w = torch.where(live, s.sides * want[s.units.clamp(min=0)].long(), 0)
        lo, hi = w - s.kmax, w - s.kmin               # b with the slice exact at w - b
        blk = torch.arange(n) // s.size
        # per block and candidate: how many live slices are exact, and whether every unscaled one is
        cover = torch.zeros(nb, width + 1, dtype=torch.long)
        a = (lo.clamp(-FOLD_SPAN, FOLD_SPAN + 1) + FOLD_SPAN)
        z = (hi.clamp(-FOLD_SPAN - 1, FOLD_SPAN) + FOLD_SPAN + 1)
        ok = a < z
        cover.index_put_((blk[live & ok], a[live & ok]), torch.ones(1, dtype=torch.long), accumulate=True)
        cover.index_put_((blk[live & ok], z[live & ok]), -torch.ones(1, dtype=torch.long), accumulate=True)
        cover = cover.cumsum(1)[:, :width]
        allowed = torch.ones(nb, width, dtype=torch.bool)
        dead = ~live
        if bool(dead.any()):
            hlo = torch.full((nb,), -UNBOUNDED, dtype=torch.long).scatter_reduce(0, blk[dead], lo[dead], "amax")
            hhi = torch.full((nb,), UNBOUNDED, dtype=torch.long).scatter_reduce(0, blk[dead], hi[dead], "amin")
            allowed &= (cands[None, :] >= hlo[:, None]) & (cands[None, :] <= hhi[:, None])
        slo, shi = scale_fold_range(tensors[s.role + SCALE_SUFFIX], s.axis)
        allowed &= (cands[None, :] >= slo[:, None]) & (cands[None, :] <= shi[:, None])
        tie = 2 * cands.abs() + (cands > 0)           # smaller is better
        key = torch.where(allowed, cover * (4 * width) - tie[None, :], torch.iinfo(torch.long).min)
        b = cands[key.argmax(1)]
        out[(s.role, s.axis)] = torch.where(cover.gather(1, key.argmax(1, keepdim=True)).squeeze(1) > 0, b, 0)
    return out


def settle_folds(slices: list[Slices], folds: dict, n_units: int, lo0: torch.Tensor, hi0: torch.Tensor):
    """Folds with every unit's range nonempty: where a unit's members' folds (and its other
    bounds [lo0, hi0], int, containing 0) leave it no exponent, every block holding one of its
    slices goes back to b = 0 (which always leaves one), until none is left. (new folds, lo, hi)."""
    folds = {k: v.clone() for k, v in folds.items()}
    while True:
        lo, hi = unit_exponents(slices, n_units, folds)
        lo, hi = torch.maximum(lo, lo0), torch.minimum(hi, hi0)
        empty = lo > hi
        if not bool(empty.any()):
            return folds, lo, hi
        for s in slices:
            hit = (s.units >= 0) & empty[s.units.clamp(min=0)]
            blk = torch.unique(torch.arange(len(s.kmin))[hit] // s.size)
            folds[(s.role, s.axis)][blk] = 0


def fold_scale_inv(scale_inv: torch.Tensor, rows: torch.Tensor | None = None,
                   cols: torch.Tensor | None = None) -> torch.Tensor:
    """``scale_inv`` with row-block i times ``2**rows[i]`` and column-block j times ``2**cols[j]``
    (int exponents; None: 0), float32, each value checked to be exact (``Fp8NotExact``)."""
    x = scale_inv.to(torch.float64)
    if rows is not None:
        x = x * torch.exp2(rows.double()).view(-1, 1)
    if cols is not None:
        x = x * torch.exp2(cols.double()).view(1, -1)
    y = x.to(torch.float32)
    if not (bool(torch.isfinite(y).all()) and torch.equal(y.double(), x)):
        raise Fp8NotExact("a folded weight_scale_inv value is not exact in float32")
    return y
