"""FP8 block-quantised linear weights (DeepSeek-V3 / Kimi K2 as released): the math wisca
needs to rescale them in their own format.

A quantised weight ``X.weight`` is float8_e4m3fn ``[out, in]`` with a float32
``X.weight_scale_inv`` ``[ceil(out / bm), ceil(in / bn)]`` (``weight_block_size`` [bm, bn]);
the weight the model computes with is ``code[r, c] * scale_inv[r // bm, c // bn]``, in float32,
then cast to the model's dtype (transformers' ``_dequantize_fp8_weight``; its loader's
``Fp8Dequantize`` gives the same wherever the blocks divide the shape, and refuses a partial
last block, which DeepSeek-V3's ``kv_a_proj_with_mqa`` [576, 7168] has). A power of two ``2**k`` on a
row or column of the codes scales the dequantised weight by exactly ``2**k`` (the float32
product only changes exponent), so ``scale_inv`` is kept byte for byte and the transform is
exact as long as every scaled code is again an e4m3fn value: ``|v| 2**k <= 448``, and a value
written ``M 2**q`` (M odd) needs ``q + k >= -9`` (the subnormal step). ``exponent_limits``
gives, per row or column, the k that keep every code exact; ``unit_limits`` intersects them
over a pair's members (both sides); ``scale_codes`` applies the scales and checks every value
(``Fp8NotExact`` on any rounding: a bug, never written).
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


def unit_limits(members, tensors: dict[str, torch.Tensor], n_units: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per unit, [lo, hi] (float64 powers of two) for its scale s so that every FP8 code it
    touches stays exact: side +1 slices are multiplied by s, side -1 slices by 1/s. None when
    the pair touches no FP8 tensor."""
    lo = torch.full((n_units,), -UNBOUNDED, dtype=torch.int16)
    hi = torch.full((n_units,), UNBOUNDED, dtype=torch.int16)
    found = False
    for m in members:
        t = tensors[m.role]
        if not is_fp8(t):
            continue
        if m.units.dim() != 1 or t.dim() != 2:
            raise ValueError(f"{m.role}: FP8 weights are read as 2-D [out, in] tensors only")
        found = True
        kmin, kmax = exponent_limits(t, m.axis)
        if m.side < 0:   # the slice is multiplied by 2 ** -k
            kmin, kmax = -kmax, -kmin
        keep = m.units >= 0
        lo.scatter_reduce_(0, m.units[keep], kmin[keep], "amax")
        hi.scatter_reduce_(0, m.units[keep], kmax[keep], "amin")
    if not found:
        return None
    return torch.exp2(lo.double()), torch.exp2(hi.double())


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
