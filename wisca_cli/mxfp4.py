"""MXFP4 experts (gpt-oss): what wisca needs to copy them unchanged and still verify.

Blocks ``[..., out, in / 32, 16]`` (uint8) hold two FP4 e2m1 codes per byte, low nibble
first; scales ``[..., out, in / 32]`` (uint8) are e8m0 exponents with bias 127, one per
block of 32 values. No power-of-two column scale of the input can enter them (a block's
scale is shared by 32 input columns), so wisca never rescales them; the reference forward
dequantises them exactly as transformers' ``convert_moe_packed_tensors`` does.
"""

from __future__ import annotations

import torch

BLOCK = 32                    # values per scale
PARTS = ("blocks", "scales")  # tensor name suffixes: <fused name>_blocks, <fused name>_scales
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def shapes(experts: int, out: int, inner: int) -> dict[str, tuple[int, ...]]:
    """Suffix -> stored shape of the MXFP4 form of an ``[experts, out, inner]`` weight."""
    return {"blocks": (experts, out, inner // BLOCK, BLOCK // 2), "scales": (experts, out, inner // BLOCK)}


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., out, in]`` values: code ``c`` of block ``b`` is ``FP4_VALUES[c] * 2 ** (scales[b] - 127)``."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)   # [..., G, 16, 2]
    values = torch.ldexp(values.flatten(-2), (scales.to(torch.int32) - 127)[..., None])      # [..., G, 32]
    return values.flatten(-2)
