"""The reference forward pass, one decoder layer at a time, in float32.

Small pure functions on tensors keyed by role (``q``, ``k``, ``up``...), so a verifier can
stream a model layer by layer: the residual stream is carried from one call to the next
and only the current layer's weights are in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import Layout

ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu,
    "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers does."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (offset + weight) * y.to(x.dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(layout: Layout, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [T, rotary_dims], for HF-style (rotate_half) or interleaved RoPE."""
    r = layout.rotary_dims
    inv_freq = 1.0 / (layout.rope_theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    scaling = layout.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    if layout.spec.attention.get("rotary") == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x: [B, heads, T, d]; rotates the first cos.shape[-1] dims of each head."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if style == "interleaved":
        pairs = rot.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = r // 2
        turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + turned * sin, rest), dim=-1)


def linear(x: torch.Tensor, w: dict, role: str) -> torch.Tensor:
    return F.linear(x, w[role], w.get(role + "_bias"))


def attention_mask(layout: Layout, length: int) -> torch.Tensor:
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    if layout.sliding_window:
        allowed &= (i[:, None] - i[None, :]) < layout.sliding_window
    return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))


def attention(x: torch.Tensor, w: dict, layout: Layout, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    d, heads, kv = layout.head_dim, layout.heads, layout.kv_heads
    q = linear(x, w, "q").view(batch, length, heads, d).transpose(1, 2)
    k = linear(x, w, "k").view(batch, length, kv, d).transpose(1, 2)
    v = linear(x, w, "v").view(batch, length, kv, d).transpose(1, 2)
    if layout.rotary_dims:
        style = layout.spec.attention.get("rotary")
        q, k = apply_rope(q, *rope, style), apply_rope(k, *rope, style)
    k = k.repeat_interleave(layout.group_size, dim=1)
    v = v.repeat_interleave(layout.group_size, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return linear(out.transpose(1, 2).reshape(batch, length, heads * d), w, "o")


def mlp(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    act = ACTIVATIONS[layout.act]
    return linear(act(linear(x, w, "gate")) * linear(x, w, "up"), w, "down")


def decoder_layer(h: torch.Tensor, w: dict, layout: Layout, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
    """Pre-norm residual block: h + attn(norm(h)), then + mlp(norm(h))."""
    offset = layout.spec.norm.get("weight_offset", 0.0)
    h = h + attention(rms_norm(h, w["attn_norm"], layout.eps, offset), w, layout, rope, mask)
    return h + mlp(rms_norm(h, w["mlp_norm"], layout.eps, offset), w, layout)


def final_logits(h: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, layout: Layout,
                 chunk_rows: int = 8192) -> torch.Tensor:
    """Logits, computing with the head a block of vocab rows at a time (cast to h's dtype).

    ``norm_weight=None``: h is already normalised."""
    offset = layout.spec.norm.get("weight_offset", 0.0)
    x = h if norm_weight is None else rms_norm(h, norm_weight, layout.eps, offset)
    return torch.cat([F.linear(x, head[i:i + chunk_rows].to(x.dtype))
                      for i in range(0, head.shape[0], chunk_rows)], dim=-1)


def check_supported(layout: Layout) -> None:
    from .errors import WiscaError

    if layout.act not in ACTIVATIONS:
        raise WiscaError(f"config.json: hidden_act {layout.act!r} is not supported by the verifier "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    kind = (layout.rope_scaling or {}).get("rope_type", (layout.rope_scaling or {}).get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise WiscaError(f"config.json: rope scaling {kind!r} is not supported by the verifier "
                         f"(supported: default, linear, llama3)")
