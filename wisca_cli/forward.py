"""The reference forward pass, one decoder layer at a time, in float32.

Small pure functions on tensors keyed by role (``q``, ``k``, ``up``...), so a verifier can
stream a model layer by layer: the residual stream is carried from one call to the next
and only the current layer's weights are in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import WiscaError
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
    return (offset + weight.to(x.dtype)) * y.to(x.dtype)


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


def _yarn_inv_freq(inv_freq: torch.Tensor, scaling: dict, r: int, theta: float,
                   max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN (transformers' ``_compute_yarn_parameters``): per-frequency blend of the original
    and the interpolated (/ factor) frequencies, and the factor on cos and sin."""
    factor = scaling.get("factor") or max_positions / scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    old_len = scaling["original_max_position_embeddings"]

    def correction(rotations):
        return (r * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction(scaling.get("beta_fast") or 32), correction(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    high = high + 0.001 if low == high else high
    keep = 1 - torch.clamp((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep, attention


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               layout: Layout) -> torch.Tensor:
    """The family's norm over the last dim: RMSNorm (optionally ``(offset + w)``) or
    LayerNorm (bias optional). A weight of more dims (Cohere's per-head QK-norm, ``[H, d]``)
    broadcasts over the trailing dims of x."""
    weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if layout.spec.norm.kind == "layernorm":
        if weight.dim() == 1:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        y = F.layer_norm(x, (x.shape[-1],), None, None, eps) * weight
        return y if bias is None else y + bias
    return rms_norm(x, weight, eps, layout.spec.norm.weight_offset)


def rope_tables(layout: Layout, positions: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [T, rotary_dims], for HF-style (rotate_half) or interleaved RoPE."""
    r = layout.rotary_dims if layer is None else layout.rotary_dims_at(layer)
    theta, scaling = (layout.rope_theta, layout.rope_scaling) if layer is None else layout.rope_at(layer)
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attention = _yarn_inv_freq(inv_freq, scaling, r, theta,
                                             int(layout.config.get("max_position_embeddings") or 0))
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    if layout.spec.attention.rotary == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    if attention != 1.0:
        return emb.cos() * attention, emb.sin() * attention
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


CONVERT_BLOCK = 1 << 20    # elements of a stored-narrower weight converted at a time


def linear(x: torch.Tensor, w: dict, role: str) -> torch.Tensor:
    """``x W^T + b`` in x's dtype. A weight stored narrower (bf16 verified in float32) is
    converted here a block of output rows at a time, so neither a layer nor a whole matrix
    is ever held twice."""
    weight, b = w[role], w.get(role + "_bias")
    b = None if b is None else b.to(x.dtype)
    if weight.dtype == x.dtype or weight.numel() <= CONVERT_BLOCK:
        return F.linear(x, weight.to(x.dtype), b)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    step = max(1, CONVERT_BLOCK // weight.shape[1])
    for r in range(0, weight.shape[0], step):
        out[..., r:r + step] = F.linear(x, weight[r:r + step].to(x.dtype), None if b is None else b[r:r + step])
    return out


def attention_mask(layout: Layout, length: int, layer: int | None = None) -> torch.Tensor:
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    window = layout.sliding_window if layer is None else layout.window_at(layer)
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))


def logical(layout: Layout, w: dict) -> dict:
    """A layer's tensors as the math reads them: fused tensors split into their parts
    (views), Conv1D ``[in, out]`` weights transposed to ``[out, in]``."""
    spec = layout.spec
    if spec.linear == "conv1d":
        w = {k: v.t() if v.dim() == 2 else v for k, v in w.items()}
    if spec.fused:
        w = dict(w)
        for fused in spec.fused:
            if fused not in w:
                continue
            for part, rows in layout.fused_parts(fused).items():
                w[part] = w[fused][rows]
                if fused + "_bias" in w:
                    w[part + "_bias"] = w[fused + "_bias"][rows]
    if layout.fused_experts and any(k.startswith("experts.") for k in w):
        w = dict(w)
        for fused, info in layout.spec.moe.fused_experts.items():
            t, b = w.get("experts." + fused), w.get(f"experts.{fused}_bias")
            if t is None:
                continue
            t = t.permute(0, info.dims.index("out"), info.dims.index("in"))   # [E, out, in]: views
            for part, rows in layout.expert_parts(fused).items():
                for e in range(layout.experts):
                    w[f"experts.{e}.{part}"] = t[e, rows]
                    if b is not None:
                        w[f"experts.{e}.{part}_bias"] = b[e, rows]
    return w


def _softcap(x: torch.Tensor, cap) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def attention(x: torch.Tensor, w: dict, layout: Layout, rope: tuple | None, mask: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    d, heads, kv = layout.head_dim, layout.heads, layout.kv_heads
    att = layout.spec.attention
    q, k, v = linear(x, w, "q"), linear(x, w, "k"), linear(x, w, "v")
    qk_norm = att.qk_norm if "q_norm" in w else None   # QK-norm: the family's norm kind

    def qk(x, role):
        return layer_norm(x, w[role], w.get(role + "_bias"), layout.eps, layout)

    if qk_norm == "full":                # OLMo2: over the whole projection
        q, k = qk(q, "q_norm"), qk(k, "k_norm")
    q, k, v = q.view(batch, length, heads, d), k.view(batch, length, kv, d), v.view(batch, length, kv, d)
    if qk_norm in ("head", "heads"):     # per head: one shared weight (Qwen3, Gemma3), or one per head (Cohere)
        q, k = qk(q, "q_norm"), qk(k, "k_norm")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rope is not None:
        style = att.rotary
        q, k = apply_rope(q, *rope, style), apply_rope(k, *rope, style)
    k = k.repeat_interleave(layout.group_size, dim=1)
    v = v.repeat_interleave(layout.group_size, dim=1)
    scale = att.scale
    if scale is not None and scale.inv_sqrt is not None:
        scaling = layout.value(scale.inv_sqrt, d) ** -0.5
    elif scale is not None:
        scaling = layout.value(scale.value, d ** -0.5)
    else:
        scaling = d ** -0.5
    scores = _softcap((q @ k.transpose(-1, -2)) * scaling, layout.value(att.softcap)) + mask
    if "sinks" in w:   # gpt-oss: one more logit per head, dropped after the softmax
        sinks = w["sinks"].to(scores.dtype).reshape(1, -1, 1, 1).expand(batch, -1, length, 1)
        scores = torch.cat([scores, sinks], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
        out = probs.to(q.dtype) @ v
    else:
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return linear(out.transpose(1, 2).reshape(batch, length, heads * d), w, "o")


def activation(layout: Layout):
    """The MLP's activation function (a clear error for one the forward does not have)."""
    if layout.act not in ACTIVATIONS:
        raise WiscaError(f"config.json: activation {layout.act!r} is not supported by the verifier "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[layout.act]


def gated_mlp(x: torch.Tensor, w: dict, layout: Layout, prefix: str = "") -> torch.Tensor:
    gate, up = linear(x, w, prefix + "gate"), linear(x, w, prefix + "up")
    mlp = layout.spec.mlp
    if mlp.kind == "clamped":   # gpt-oss: neither gate nor up is scale-equivariant
        limit, alpha = layout.value(mlp.limit), layout.value(mlp.alpha)
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), w, prefix + "down")
    return linear(activation(layout)(gate) * up, w, prefix + "down")


def mlp(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    """Gated (SwiGLU, GeGLU), plain (fc1 -> act -> fc2, ``up`` and ``down``) or MoE."""
    if "router" in w:
        return moe(x, w, layout)
    if layout.spec.mlp.kind == "plain":
        return linear(activation(layout)(linear(x, w, "up")), w, "down")
    return gated_mlp(x, w, layout)


def moe(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    """Top-k routed experts (softmax in float32, optionally renormalised) plus a shared expert."""
    spec = layout.spec.moe
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    bias = w.get("router_bias")
    probs = torch.softmax(F.linear(x, w["router"].to(x.dtype), None if bias is None else bias.to(x.dtype)),
                          dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, int(layout.value(spec.top_k)), dim=-1)
    if layout.value(spec.norm_topk, False):
        top = top / top.sum(-1, keepdim=True)
    top = top.to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(layout.experts):
        token, slot = torch.where(idx == e)
        if len(token):
            y = gated_mlp(x[token], w, layout, f"experts.{e}.") * top[token, slot, None]
            out.index_add_(0, token, y)
    if "shared.up" in w:
        shared = gated_mlp(x, w, layout, "shared.")
        if "shared_gate" in w:
            shared = torch.sigmoid(F.linear(x, w["shared_gate"].to(x.dtype))) * shared
        out = out + shared
    return out.reshape(shape)


def _norm(x: torch.Tensor, w: dict, role: str, layout: Layout) -> torch.Tensor:
    return layer_norm(x, w[role], w.get(role + "_bias"), layout.eps, layout) if role in w else x


def decoder_layer(h: torch.Tensor, w: dict, layout: Layout, rope: tuple | None, mask: torch.Tensor) -> torch.Tensor:
    """One block, driven by which norms the spec has: pre-norm (``attn_norm``, ``mlp_norm``),
    sandwich (Gemma: also ``post_attn_norm``, ``post_mlp_norm``), post-norm (OLMo2: only the
    post norms), or parallel residual (GPT-NeoX: h + attn(ln1 h) + mlp(ln2 h))."""
    w = logical(layout, w)
    block = layout.spec.block
    res = layout.value(block.residual_multiplier, 1.0)
    x = _norm(h, w, "attn_norm", layout)
    a = _norm(attention(x, w, layout, rope, mask), w, "post_attn_norm", layout)
    if layout.value(block.parallel_residual, False):   # shared_norm: the MLP reads attn_norm too (Cohere, Phi)
        return h + (mlp(x if block.shared_norm else _norm(h, w, "mlp_norm", layout), w, layout) + a)
    h = h + (a * res if res != 1.0 else a)
    m = _norm(mlp(_norm(h, w, "mlp_norm", layout), w, layout), w, "post_mlp_norm", layout)
    return h + (m * res if res != 1.0 else m)


def embed_scale(layout: Layout) -> float | None:
    """The factor on the embedding output: Gemma's sqrt(hidden), Granite's multiplier."""
    scale = layout.spec.embedding.scale
    if scale == "sqrt_hidden":
        return layout.hidden ** 0.5
    value = layout.value(scale, None)
    return None if value in (None, 1.0) else float(value)


def postprocess_logits(logits: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Granite's logits divisor, Cohere's logit scale, Gemma2's final softcap (elementwise:
    any vocab block)."""
    final = layout.spec.final
    div = layout.value(final.logits_divisor, None)
    if div not in (None, 1.0):
        logits = logits / div
    mul = layout.value(final.logits_scale, None)
    if mul not in (None, 1.0):
        logits = logits * mul
    return _softcap(logits, layout.value(final.softcap, None))


def final_logits(h: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, layout: Layout,
                 chunk_rows: int = 1024, norm_bias: torch.Tensor | None = None,
                 head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits, computing with the head a block of vocab rows at a time (cast to h's dtype).

    ``norm_weight=None``: h is already normalised. ``head_bias``: the head's bias for
    these rows (Phi's lm_head)."""
    x = h if norm_weight is None else layer_norm(h, norm_weight, norm_bias, layout.eps, layout)
    return torch.cat([postprocess_logits(F.linear(x, head[i:i + chunk_rows].to(x.dtype),
                                                  None if head_bias is None else
                                                  head_bias[i:i + chunk_rows].to(x.dtype)), layout)
                      for i in range(0, head.shape[0], chunk_rows)], dim=-1)
