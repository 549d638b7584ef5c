"""The reference forward pass, one decoder layer at a time, in float32.

Small pure functions on tensors keyed by role (``q``, ``k``, ``up``...), so a verifier can
stream a model layer by layer: the residual stream is carried from one call to the next
and only the current layer's weights are in memory.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from . import fp8, mxfp4
from .errors import WiscaError
from .spec import Layout

ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             fp32_weight: bool = False) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers does (``fp32_weight``: the
    weight applied in float32 before the cast, Nemotron-H's)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if fp32_weight:
        return ((offset + weight.float()) * y).to(x.dtype)
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


def _yarn(inv_freq: torch.Tensor, theta: float, r: int, scaling: dict, layout: Layout) -> tuple[torch.Tensor, float]:
    """YaRN (transformers' ``_compute_yarn_parameters``): inverse frequencies blended between
    interpolated and extrapolated by a linear ramp over the dims, and the factor on cos/sin."""
    factor = scaling.get("factor") or layout.config["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    old_len = scaling["original_max_position_embeddings"]
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)) if mscale and mscale_all \
            else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (r * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation, attention_factor


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    return rms_norm(x, weight, eps, layout.spec.norm.weight_offset, layout.spec.norm.fp32_weight)


def rope_tables(layout: Layout, positions: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [T, rotary_dims], for HF-style (rotate_half) or interleaved RoPE."""
    r = layout.rotary_dims if layer is None else layout.rotary_dims_at(layer)
    theta, scaling = (layout.rope_theta, layout.rope_scaling) if layer is None else layout.rope_at(layer)
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(inv_freq, theta, r, scaling, layout)
    elif kind == "proportional":   # Gemma 4's full layers: the first share of the pairs turn, the rest stay
        angles = int(scaling.get("partial_rotary_factor", 1.0) * r // 2)
        turned = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / r))
        inv_freq = torch.cat([turned, torch.zeros(r // 2 - angles)]) / scaling.get("factor", 1.0)
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    if layout.rotary_style == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    if attention_factor != 1.0:
        return emb.cos() * attention_factor, emb.sin() * attention_factor
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
    if isinstance(weight, fp8.Quantized):   # FP8: dequantised a few blocks of rows at a time, as transformers does
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))
        for r, rows in fp8.dequantized_rows(weight.codes, weight.scale_inv, weight.block, x.dtype):
            out[..., r:r + len(rows)] = F.linear(x, rows, None if b is None else b[r:r + len(rows)])
        return out
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
    chunk = None if layer is None else layout.chunk_at(layer)
    if chunk:   # chunked attention (Llama 4): keys of the query's own chunk only
        allowed &= (i[:, None] // chunk) == (i[None, :] // chunk)
    return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))


def logical(layout: Layout, w: dict) -> dict:
    """A layer's tensors as the math reads them: fused tensors split into their parts
    (views), Conv1D ``[in, out]`` weights transposed to ``[out, in]``."""
    spec = layout.spec
    if layout.fp8_weights:   # FP8 weights with their block scales (dequantised in ``linear``)
        w = {k: fp8.Quantized(v, w[k + fp8.SCALE_SUFFIX], layout.fp8_block) if fp8.is_fp8(v) else v
             for k, v in w.items()}
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
    if layout.conv_split and "lin_conv_q" in w:   # the conv saved in parts, as transformers loads it
        w = {**w, "lin_conv": torch.cat([w["lin_conv_q"], w["lin_conv_k"], w["lin_conv_v"]])}
    if layout.fused_experts and any(k.startswith("experts.") for k in w):
        w = dict(w)
        for fused, info in layout.spec.moe.fused_experts.items():
            t, b = w.get("experts." + fused), w.get(f"experts.{fused}_bias")
            if t is not None:
                t = t.permute(0, info.dims.index("out"), info.dims.index("in"))   # [E, out, in]: views
            elif f"experts.{fused}_blocks" in w:   # MXFP4: dequantised here only, as transformers does
                t = mxfp4.dequantize(w[f"experts.{fused}_blocks"], w[f"experts.{fused}_scales"])
            else:
                continue
            for part, rows in layout.expert_parts(fused).items():
                for e in range(layout.experts):
                    w[f"experts.{e}.{part}"] = t[e, rows]
                    if b is not None:
                        w[f"experts.{e}.{part}_bias"] = b[e, rows]
    return w


def _softcap(x: torch.Tensor, cap) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


def attention_scaling(layout: Layout, d: int) -> float:
    """The factor on q k^T: the spec's (``inv_sqrt`` or ``value``), else ``d ** -0.5``."""
    scale = layout.spec.attention.scale
    if scale is not None and scale.inv_sqrt is not None:
        return layout.value(scale.inv_sqrt, d) ** -0.5
    if scale is not None:
        return layout.value(scale.value, d ** -0.5)
    return d ** -0.5


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A weightless RMSNorm over the last dim in float32, cast back (Llama 4's QK-norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attention_temperature(layout: Layout, length: int) -> torch.Tensor:
    """Llama 4's temperature tuning on NoPE layers, one factor on q per position (float32):
    ``log1p(floor((position + 1) / floor_scale)) * attn_scale + 1``."""
    t = layout.spec.attention.temperature
    positions = torch.arange(length, dtype=torch.float32)
    return torch.log1p(torch.floor((positions + 1.0) / layout.value(t.floor))) * layout.value(t.scale) + 1.0


def position_scale(layout: Layout, length: int) -> torch.Tensor:
    """Mistral 4's query factor per position (float32): ``1 + beta * log(1 + floor(position / max))``."""
    p = layout.spec.attention.position_scale
    positions = torch.arange(length, dtype=torch.int64)
    return 1 + float(layout.value(p.beta)) * torch.log(1 + torch.floor(positions / layout.value(p.max)))


def mla_attention(x: torch.Tensor, w: dict, layout: Layout, rope: tuple | None, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-V3), as transformers computes it: queries
    through the q latent (``q_a`` -> RMSNorm -> ``q_b``) or ``q``; ``kv_a`` gives the kv
    latent (RMSNorm -> ``kv_b``: per head k_nope, v) and one rope key shared by all heads.
    transformers' interleaved rope de-interleaves q and k alike; rotating the pairs in place
    gives the same scores (the same permutation of both). With YaRN rope and ``mscale_all_dim``
    the softmax scale is multiplied by its mscale squared, as transformers does."""
    batch, length, _ = x.shape
    mla, heads = layout.mla, layout.heads
    eps = float(layout.value(layout.spec.attention.mla.latent_eps))
    if "q_b" in w:
        q = linear(rms_norm(linear(x, w, "q_a"), w["q_a_norm"], eps), w, "q_b")
    else:
        q = linear(x, w, "q")
    q = q.view(batch, length, heads, mla.nope + mla.rope).transpose(1, 2)
    latent, k_rope = linear(x, w, "kv_a").split([mla.kv_lora, mla.rope], dim=-1)
    kv = linear(rms_norm(latent, w["kv_a_norm"], eps), w, "kv_b").view(batch, length, heads, mla.nope + mla.v)
    k_nope, v = kv.transpose(1, 2).split([mla.nope, mla.v], dim=-1)
    q_nope, q_rope = q.split([mla.nope, mla.rope], dim=-1)
    k_rope = k_rope.view(batch, 1, length, mla.rope)
    if rope is not None:
        q_rope, k_rope = apply_rope(q_rope, *rope, layout.rotary_style), apply_rope(k_rope, *rope, layout.rotary_style)
    q = torch.cat([q_nope, q_rope], dim=-1)
    if layout.spec.attention.position_scale:   # Mistral 4: q times a factor per position, in q's dtype
        q = q * position_scale(layout, length).to(q.dtype)[:, None]
    k = torch.cat([k_nope, k_rope.expand(-1, heads, -1, -1)], dim=-1)
    scaling = attention_scaling(layout, mla.nope + mla.rope)
    rope_scaling = layout.rope_scaling or {}
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default" and rope_scaling.get("mscale_all_dim"):
        scaling = scaling * yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    scores = (q @ k.transpose(-1, -2)) * scaling + mask
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return linear(out.transpose(1, 2).reshape(batch, length, heads * mla.v), w, "o")


def attention(x: torch.Tensor, w: dict, layout: Layout, rope: tuple | None, mask: torch.Tensor,
              layer: int | None = None, ctx: dict | None = None) -> torch.Tensor:
    """Attention of one layer (``layout`` already at that layer's sizes). ``ctx["kv"]``: the keys
    and values a layer stores for later layers that reuse them (Gemma 4's kv sharing)."""
    if layout.mla:
        return mla_attention(x, w, layout, rope, mask)
    batch, length, _ = x.shape
    d, heads, kv = layout.head_dim, layout.heads, layout.kv_heads
    att = layout.spec.attention
    mode = layout.kv_mode(layer) if layer is not None and att.kv_shared else None
    if mode == "reuse":   # the stored layer's keys and values, after their norms and RoPE
        return _attend(linear(x, w, "q"), *ctx["kv"][layout.layer_type(layer)], w, layout, rope, mask, length)
    q, k = linear(x, w, "q"), linear(x, w, "k")
    v = k if "v" not in w and att.k_eq_v else linear(x, w, "v")   # Gemma 4's k_eq_v: k_proj's output
    gate = None
    if att.output_gate:   # q_proj's rows per head: [q d | gate d]
        q, gate = q.view(batch, length, heads, 2 * d).chunk(2, dim=-1)
        q, gate = q.reshape(batch, length, heads * d), gate.reshape(batch, length, heads * d)
    qk_norm = att.qk_norm if "q_norm" in w else None   # QK-norm: the family's norm kind

    def qk(x, role):
        return layer_norm(x, w[role], w.get(role + "_bias"), layout.eps, layout)

    if qk_norm == "full":                # OLMo2: over the whole projection
        q, k = qk(q, "q_norm"), qk(k, "k_norm")
    q, k, v = q.view(batch, length, heads, d), k.view(batch, length, kv, d), v.view(batch, length, kv, d)
    if qk_norm in ("head", "heads"):     # per head: one shared weight (Qwen3, Gemma3), or one per head (Cohere)
        q, k = qk(q, "q_norm"), qk(k, "k_norm")
    if att.v_norm:                       # Gemma 4: v RMS-normalised per head, no weight
        v = l2_norm(v, layout.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rope is not None:
        style = layout.rotary_style
        q, k = apply_rope(q, *rope, style), apply_rope(k, *rope, style)
        if att.qk_l2_norm and layout.config_flag(att.qk_l2_norm):   # Llama 4: after RoPE, no weight
            q, k = l2_norm(q, layout.eps), l2_norm(k, layout.eps)
    elif att.temperature and layout.config_flag(att.temperature.when):   # Llama 4's NoPE layers
        q = (q * attention_temperature(layout, length)[:, None]).to(q.dtype)
    if mode == "store":
        ctx["kv"][layout.layer_type(layer)] = (k, v)
    return _attend(q, k, v, w, layout, None, mask, length, gate)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: dict, layout: Layout, rope: tuple | None,
            mask: torch.Tensor, length: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Scores, softmax and o_proj from q ([B, T, H*d] projected, with ``rope`` still to normalise and
    turn: a layer reusing another's keys; else [B, H, T, d] ready) and k, v [B, kv heads, T, d]."""
    att, d, heads = layout.spec.attention, layout.head_dim, layout.heads
    batch = q.shape[0]
    if q.dim() == 3:   # a reusing layer's own queries: its q_norm and RoPE
        q = q.view(batch, length, heads, d)
        if att.qk_norm in ("head", "heads"):
            q = layer_norm(q, w["q_norm"], w.get("q_norm_bias"), layout.eps, layout)
        q = q.transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope, layout.rotary_style)
    k = k.repeat_interleave(layout.group_size, dim=1)
    v = v.repeat_interleave(layout.group_size, dim=1)
    scores = _softcap((q @ k.transpose(-1, -2)) * attention_scaling(layout, d), layout.value(att.softcap)) + mask
    if "sinks" in w:   # gpt-oss: one more logit per head, dropped after the softmax
        sinks = w["sinks"].to(scores.dtype).reshape(1, -1, 1, 1).expand(batch, -1, length, 1)
        scores = torch.cat([scores, sinks], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
        out = probs.to(q.dtype) @ v
    else:
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    out = out.transpose(1, 2).reshape(batch, length, heads * d)
    return linear(out if gate is None else out * torch.sigmoid(gate), w, "o")


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor) -> torch.Tensor:
    """The gated delta rule, token by token, in float32: per value head a state S [dk, dv],
    decayed by exp(g_t), corrected towards v_t along k_t with strength beta_t, read by q_t.
    q, k [B, L, H, dk] (already L2-normalised and repeated to the value heads), v [B, L, H, dv],
    g and beta [B, L, H]. Returns [B, L, H, dv]."""
    q, k, v, g, beta = (t.transpose(1, 2).float() for t in (q, k, v, g, beta))
    batch, heads, length, dk = k.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1])
    out = torch.empty_like(v)
    for t in range(length):
        state = state * g[:, :, t].exp()[..., None, None]
        delta = (v[:, :, t] - (state * k[:, :, t, :, None]).sum(-2)) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[..., None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2)


def _json_float(v) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def mamba2(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    """A Mamba2 mixer (Granite 4): in_proj's rows are [z | x B C | dt]; x, B and C pass a
    depthwise causal conv (with its bias) and SiLU; per head h the state S [head dim, state] is
    decayed by exp(dt A) and fed dt x B^T, where dt = softplus(dt + dt_bias) clamped to the
    config's time_step_limit and A = -exp(A_log); y = S C + D x (B and C shared by the heads of a
    group). The output y SiLU(z) is RMS-normalised per group of heads (weight ``lin_norm``),
    then ``lin_out``. Token by token in float32."""
    lin, (batch, length, _) = layout.linear, x.shape
    groups, heads, state, hd = lin.key_heads, lin.value_heads, lin.key_dim, lin.value_dim
    inner, conv_dim = heads * hd, heads * hd + 2 * groups * state
    z, xbc, dt = linear(x, w, "lin_in").split([inner, conv_dim, heads], dim=-1)
    conv = w["lin_conv"]
    bias = w.get("lin_conv_bias")
    xbc = F.conv1d(xbc.transpose(1, 2).to(conv.dtype), conv, None if bias is None else bias.to(conv.dtype),
                   padding=lin.conv_kernel - 1, groups=conv_dim)
    xbc = F.silu(xbc[..., :length]).to(x.dtype).transpose(1, 2)
    xs, B, C = xbc.split([inner, groups * state, groups * state], dim=-1)
    lo, hi = (_json_float(v) for v in (layout.config.get("time_step_limit") or (0.0, float("inf")))[:2])
    dt = F.softplus(dt.float() + w["lin_dt_bias"].float()).clamp(min=lo, max=hi)   # [B, L, H]
    A = -w["lin_A_log"].float().exp()
    xs = xs.float().reshape(batch, length, heads, hd)
    rep = heads // groups
    B = B.float().reshape(batch, length, groups, state).repeat_interleave(rep, dim=2)
    C = C.float().reshape(batch, length, groups, state).repeat_interleave(rep, dim=2)
    S = xs.new_zeros(batch, heads, hd, state)
    y = torch.empty_like(xs)
    for t in range(length):
        S = S * (dt[:, t] * A).exp()[..., None, None] + (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]
        y[:, t] = (S * C[:, t, :, None, :]).sum(-1)
    y = (y + xs * w["lin_D"].float()[:, None]).reshape(batch, length, inner).to(x.dtype)
    g = y.float() * F.silu(z.float())
    g = g.reshape(batch, length, groups, inner // groups)
    g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + layout.eps)).reshape(batch, length, inner)
    y = w["lin_norm"].to(x.dtype) * g.to(x.dtype)
    return linear(y, w, "lin_out")


def linear_attention(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    """A Gated DeltaNet token mixer (Qwen3-Next, Qwen3.5, OLMo-hybrid): q, k, v through a
    depthwise causal conv and SiLU, q and k L2-normalised per head (q also / sqrt(dk)),
    beta = sigmoid(b) (doubled with the spec's ``beta_doubled`` flag), decay
    g = -exp(A_log) softplus(a + dt_bias); the rule's output through an RMSNorm per value head
    (weight ``lin_norm``, the spec's offset and eps) times SiLU(z), then ``lin_out``."""
    if layout.spec.linear_attention.kind == "mamba2":
        return mamba2(x, w, layout)
    lin, (batch, length, _) = layout.linear, x.shape
    hk, hv, dk, dv = lin.key_heads, lin.value_heads, lin.key_dim, lin.value_dim
    mixed = torch.cat([linear(x, w, "lin_q"), linear(x, w, "lin_k"), linear(x, w, "lin_v")], dim=-1).transpose(1, 2)
    conv = w["lin_conv"]
    mixed = F.conv1d(mixed.to(conv.dtype), conv, None, padding=lin.conv_kernel - 1, groups=mixed.shape[1])
    mixed = F.silu(mixed[..., :length]).to(x.dtype).transpose(1, 2)
    q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], dim=-1)
    q, k, v = q.reshape(batch, length, hk, dk), k.reshape(batch, length, hk, dk), v.reshape(batch, length, hv, dv)
    la = layout.spec.linear_attention
    beta = torch.sigmoid(linear(x, w, "lin_b"))
    if la.beta_doubled and layout.config_flag(la.beta_doubled):   # OLMo-hybrid: beta in [0, 2]
        beta = beta * 2.0
    g = -w["lin_A_log"].float().exp() * F.softplus(linear(x, w, "lin_a").float() + w["lin_dt_bias"])
    if hv != hk:   # each key head serves hv / hk consecutive value heads
        q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
    q, k = q.float(), k.float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk ** 0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    core = gated_delta_rule(q, k, v, g, beta).to(x.dtype)
    z = linear(x, w, "lin_z").reshape(batch, length, hv, dv)
    cf = core.float()
    eps = layout.eps if la.norm_eps is None else la.norm_eps
    normed = (cf * torch.rsqrt(cf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    weight = w["lin_norm"].to(x.dtype)
    if la.norm_offset:
        weight = la.norm_offset + weight
    y = ((weight * normed) * F.silu(z.float())).to(x.dtype)
    return linear(y.reshape(batch, length, hv * dv), w, "lin_out")


def activation(layout: Layout):
    """The MLP's activation function (a clear error for one the forward does not have)."""
    if layout.act not in ACTIVATIONS:
        raise WiscaError(f"config.json: activation {layout.act!r} is not supported by the verifier "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[layout.act]


def gated_mlp(x: torch.Tensor, w: dict, layout: Layout, prefix: str = "") -> torch.Tensor:
    gate, up = linear(x, w, prefix + "gate"), linear(x, w, prefix + "up")
    mlp = layout.spec.mlp
    if mlp.kind == "limited":   # DeepSeek-V4: gate clamped from above, up both ways, before they multiply
        limit = layout.value(mlp.limit)
        return linear(activation(layout)(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit), w, prefix + "down")
    if mlp.kind == "clamped":   # gpt-oss: neither gate nor up is scale-equivariant
        limit, alpha = layout.value(mlp.limit), layout.value(mlp.alpha)
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), w, prefix + "down")
    return linear(activation(layout)(gate) * up, w, prefix + "down")


def one_mlp(x: torch.Tensor, w: dict, layout: Layout, prefix: str = "") -> torch.Tensor:
    """One MLP (dense, an expert, the shared expert): gated, or plain (fc1 -> act -> fc2, ``up``
    and ``down``: Nemotron-H's relu² experts too)."""
    if layout.spec.mlp.kind == "plain":
        return linear(activation(layout)(linear(x, w, prefix + "up")), w, prefix + "down")
    return gated_mlp(x, w, layout, prefix)


def mlp(x: torch.Tensor, w: dict, layout: Layout) -> torch.Tensor:
    """Gated (SwiGLU, GeGLU), plain (fc1 -> act -> fc2, ``up`` and ``down``) or MoE."""
    if "router" in w:
        return moe(x, w, layout)
    return one_mlp(x, w, layout)


def route(x: torch.Tensor, w: dict, layout: Layout, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), [tokens, top_k] each, as the family's router computes them.

    ``softmax``: softmax over all experts in float32, top-k, optionally renormalised.
    ``sigmoid`` (DeepSeek-V3, GLM-4.5): sigmoid scores in float32; experts are chosen on
    scores + the correction bias, only among the ``topk_groups`` groups whose two best
    choice scores sum highest; the weights are the chosen experts' plain scores,
    optionally renormalised (+1e-20), times the scaling factor. ``topk_sigmoid`` (Llama 4):
    the top-k logits, each weighted by its sigmoid. ``topk_softmax`` (Granite): a softmax over
    the top-k logits."""
    spec = layout.spec.moe
    top_k = int(layout.value(spec.top_k))
    if spec.routing == "softmax":
        bias = w.get("router_bias")    # gpt-oss
        probs = torch.softmax(F.linear(x, w["router"].to(x.dtype), None if bias is None else bias.to(x.dtype)),
                              dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, top_k, dim=-1)
        if layout.value(spec.norm_topk, False):
            top = top / top.sum(-1, keepdim=True)
    elif spec.routing == "scaled_softmax":   # Gemma 4: a weightless RMSNorm, times its scale and hidden ** -0.5
        xs = l2_norm(x, layout.eps) * w["router_norm"].to(x.dtype) * layout.hidden ** -0.5
        probs = torch.softmax(F.linear(xs, w["router"].to(x.dtype)), dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True) * w["router_expert_scale"][idx]
    elif spec.routing == "sqrtsoftplus":   # DeepSeek-V4: on a hash layer the token's table row picks
        scores = F.softplus(F.linear(x, w["router"].to(x.dtype))).sqrt()
        if "router_table" in w:
            idx = w["router_table"][ids.reshape(-1)].long()
        else:
            choice = scores + w["router_correction"].float() if "router_correction" in w else scores
            idx = torch.topk(choice, top_k, dim=-1, sorted=False).indices
        top = scores.gather(1, idx)
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    elif spec.routing == "topk_softmax":   # Granite: top-k of the fp32 logits, a softmax over those
        top, idx = F.linear(x, w["router"].to(x.dtype)).float().topk(top_k, dim=-1)
        top = torch.softmax(top, dim=-1).to(x.dtype)
    elif spec.routing == "topk_sigmoid":   # Llama 4: top-k of the logits, the sigmoid of each its weight
        top, idx = torch.topk(F.linear(x, w["router"].to(x.dtype)), top_k, dim=-1)
        top = torch.sigmoid(top.float())
    elif spec.routing == "softmax_group":   # Mistral 4: softmax in x's dtype, DeepSeek's group-limited top-k
        scores = F.linear(x, w["router"].to(x.dtype)).softmax(-1)
        groups = int(layout.value(spec.groups, 1))
        group_scores = scores.view(-1, groups, layout.experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        chosen = torch.topk(group_scores, k=int(layout.value(spec.topk_groups, 1)), dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, chosen, 1).bool().repeat_interleave(layout.experts // groups, 1)
        idx = torch.topk(scores.masked_fill(~keep, 0.0), k=top_k, dim=-1, sorted=False)[1]
        top = scores.gather(1, idx)
        if layout.value(spec.norm_topk, False):
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        scores = F.linear(x.float(), w["router"].float()).sigmoid()
        choice = scores + w["router_correction"].float() if "router_correction" in w else scores
        groups = int(layout.value(spec.groups, 1))
        group_scores = choice.view(-1, groups, layout.experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        chosen = torch.topk(group_scores, k=int(layout.value(spec.topk_groups, 1)), dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, chosen, 1).bool().repeat_interleave(layout.experts // groups, 1)
        idx = torch.topk(choice.masked_fill(~keep, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
        top = scores.gather(1, idx)
        if layout.value(spec.norm_topk, False):
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    factor = layout.value(spec.scaling, 1.0)
    return (top * factor if factor != 1.0 else top), idx


def moe(x: torch.Tensor, w: dict, layout: Layout, routed_on: torch.Tensor | None = None,
        ids: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k routed experts (``route``, on x or on ``routed_on``; the weight on each expert's
    output, or on its input with ``moe.weighted_input``) plus a shared expert. ``ids``: the
    tokens, for a layer that routes by a token table."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    top, idx = route(x if routed_on is None else routed_on.reshape(-1, shape[-1]), w, layout, ids)
    top = top.to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(layout.experts):
        token, slot = torch.where(idx == e)
        if len(token):
            weight, prefix = top[token, slot, None], f"experts.{e}."
            if layout.spec.moe.weighted_input:   # Llama 4: the expert reads the weighted token
                y = one_mlp(x[token] * weight, w, layout, prefix)
            else:
                y = one_mlp(x[token], w, layout, prefix) * weight
            out.index_add_(0, token, y)
    if "shared.up" in w:
        shared = one_mlp(x, w, layout, "shared.")
        if "shared_gate" in w:
            shared = torch.sigmoid(F.linear(x, w["shared_gate"].to(x.dtype))) * shared
        out = out + shared
    return out.reshape(shape)


def _unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x times its inverse RMS over the last dim (computed in float32, cast to x's dtype first)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def _rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing cos.shape[-1] dims of x, in float32 (DeepSeek-V4's)."""
    r = cos.shape[-1]
    keep, rot = x[..., :-r], x[..., -r:]
    pairs = rot.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat([keep, (rot.float() * cos + turned.float() * sin).to(x.dtype)], dim=-1)


def _compressed_entries(x: torch.Tensor, w: dict, layout: Layout, layer: int, prefix: str, rate: int, d: int,
                        overlap: bool) -> torch.Tensor:
    """One entry per complete window of ``rate`` tokens [B, n, d]: the softmax-gated sum (over the
    window, per channel; with ``overlap`` over the previous window's first series and this one's
    second) of the ``{prefix}kv`` rows, RMS-normalised (``{prefix}norm``) and turned by RoPE at the
    window's first position."""
    kv, gate = linear(x, w, prefix + "kv"), linear(x, w, prefix + "gate")
    batch, length = x.shape[:2]
    n = length // rate
    if n == 0:
        return x.new_zeros(batch, 0, d)
    kv = kv[:, :n * rate].view(batch, n, rate, -1)
    gate = gate[:, :n * rate].view(batch, n, rate, -1) + w[prefix + "bias"]
    if overlap:   # entry i: window i-1's first series with window i's second, over 2 x rate slots
        both_kv = kv.new_zeros(batch, n, 2 * rate, d)
        both_gate = gate.new_full((batch, n, 2 * rate, d), float("-inf"))
        both_kv[:, :, rate:], both_gate[:, :, rate:] = kv[..., d:], gate[..., d:]
        both_kv[:, 1:, :rate], both_gate[:, 1:, :rate] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
        kv, gate = both_kv, both_gate
    entries = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
    entries = rms_norm(entries, w[prefix + "norm"], layout.eps, fp32_weight=True)
    cos, sin = rope_tables(layout, torch.arange(n) * rate, layer)
    return _rope_tail(entries, cos.to(entries.dtype), sin.to(entries.dtype))


def compressed_attention(x: torch.Tensor, w: dict, layout: Layout, rope: tuple, mask: torch.Tensor,
                         layer: int) -> torch.Tensor:
    """DeepSeek-V4's attention (``attention.compressed``), as transformers computes it without a cache.
    Queries: ``q_a`` -> ``q_a_norm`` -> ``q_b``, RMS-normalised per head without a weight, RoPE on the
    trailing dims; one kv head (``kv`` -> ``kv_norm``, RoPE) is the keys and the values. On compressed
    layers the keys also hold one entry per window (query t sees entry i when i < (t + 1) // rate;
    on the sparse layers only the indexer's top-k of those). Softmax with per-head sinks; RoPE undone
    on the output's trailing dims; then ``o_a`` per group of heads and ``o_b``."""
    comp = layout.spec.attention.compressed
    batch, length, _ = x.shape
    heads, d, eps = layout.heads, layout.head_dim, layout.eps
    cos, sin = rope
    q_res = rms_norm(linear(x, w, "q_a"), w["q_a_norm"], eps, fp32_weight=True)
    q = _rope_tail(_unweighted_rms(linear(q_res, w, "q_b").view(batch, length, heads, d).transpose(1, 2), eps), cos, sin)
    kv = rms_norm(linear(x, w, "kv"), w["kv_norm"], eps, fp32_weight=True).view(batch, 1, length, d)
    kv = _rope_tail(kv, cos, sin)
    kind = layout.layer_type(layer)
    if kind in (comp.sparse_type, comp.heavy_type):
        rate = int(layout.config[comp.rates][kind])
        sparse = kind == comp.sparse_type
        entries = _compressed_entries(x, w, layout, layer, "comp_", rate, d, sparse)
        n = entries.shape[1]
        visible = torch.arange(n)[None, :] < ((torch.arange(length) + 1) // rate)[:, None]   # [T, n]
        bias = torch.zeros(batch, 1, length, n, dtype=x.dtype).masked_fill(~visible, float("-inf"))
        if sparse and n:   # the indexer: each query's top-k entries by sum_h w_h relu(q_h . k)
            idim, ih = int(layout.config[comp.index_head_dim]), int(layout.config[comp.index_heads])
            keys = _compressed_entries(x, w, layout, layer, "idx_", rate, idim, True)
            iq = _rope_tail(linear(q_res, w, "idx_q").view(batch, length, ih, idim).transpose(1, 2), cos, sin)
            iq = iq.transpose(1, 2)                                                  # [B, T, H, d]
            scores = torch.relu(iq.float() @ keys.transpose(-1, -2).float().unsqueeze(1)) * idim ** -0.5
            weights = linear(x, w, "idx_w").float() * ih ** -0.5                    # [B, T, H]
            index = (scores * weights.unsqueeze(-1)).sum(dim=2).masked_fill(~visible, float("-inf"))
            top = index.topk(min(int(layout.config[comp.index_topk]), n), dim=-1).indices
            top = torch.where(top < ((torch.arange(length) + 1) // rate)[None, :, None], top, n)
            chosen = torch.full((batch, 1, length, n + 1), float("-inf"), dtype=x.dtype)
            bias = chosen.scatter_(-1, top.unsqueeze(1), 0.0)[..., :n]
        kv = torch.cat([kv, entries.unsqueeze(1)], dim=2)
        mask = torch.cat([mask.expand(batch, 1, length, length), bias], dim=-1)
    scores = (q @ kv.transpose(-1, -2)) * d ** -0.5 + mask
    sinks = w["sinks"].to(scores.dtype).reshape(1, -1, 1, 1).expand(batch, -1, length, 1)
    scores = torch.cat([scores, sinks], dim=-1)
    scores = scores - scores.max(dim=-1, keepdim=True).values
    out = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1].to(kv.dtype) @ kv
    out = _rope_tail(out, cos, -sin).transpose(1, 2)                                # [B, T, H, d]
    groups = int(layout.config[comp.o_groups])
    grouped = out.reshape(batch, length, groups, -1)
    o_a = w["o_a"].to(x.dtype)
    grouped = torch.einsum("btgi,gri->btgr", grouped, o_a.view(groups, -1, o_a.shape[1]))
    return linear(grouped.flatten(2), w, "o_b")


def hyper_mix(h: torch.Tensor, w: dict, sub: str, layout: Layout) -> tuple:
    """A hyper-connection (DeepSeek-V4's mHC) before sub-block ``sub``: from the streams h [B, T, N, D],
    RMS-normalised together, the weights pre (collapse into the sub-block's input), post (spread its
    output) and comb (mix the streams: Sinkhorn-normalised to doubly stochastic), in float32."""
    hyper, n = layout.spec.block.hyper, layout.streams
    eps_hc, iters = float(layout.value(hyper.eps)), int(layout.value(hyper.iters))
    flat = _unweighted_rms(h.reshape(*h.shape[:2], -1).float(), layout.eps)
    mix = F.linear(flat, w[f"hc_{sub}_fn"].float())
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = w[f"hc_{sub}_base"].float().split([n, n, n * n])
    pre_s, post_s, comb_s = w[f"hc_{sub}_scale"].float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps_hc
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.view(*comb_w.shape[:-1], n, n) * comb_s + comb_b.view(n, n), dim=-1) + eps_hc
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps_hc)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps_hc)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps_hc)
    return post, comb, (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)


def hyper_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               layout: Layout) -> torch.Tensor:
    """The streams [B, T, N, D] collapsed into one before the final norm (DeepSeek-V4's hc_head)."""
    flat = _unweighted_rms(h.flatten(2).float(), layout.eps)
    pre = torch.sigmoid(F.linear(flat, fn.float()) * scale.float() + base.float()) + float(layout.value(layout.spec.block.hyper.eps))
    return (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)


def hyper_layer(h: torch.Tensor, w: dict, layout: Layout, rope: tuple, mask: torch.Tensor, layer: int,
                ctx: dict) -> torch.Tensor:
    """A DeepSeek-V4 block on the streams h [B, T, N, D]: each sub-block reads its hyper-connection's
    mix of the streams through its norm, and its output is spread back: post x out + comb^T h."""
    dtype = h.dtype
    post, comb, x = hyper_mix(h, w, "attn", layout)
    a = compressed_attention(_norm(x, w, "attn_norm", layout), w, layout, rope, mask, layer)
    h = post.to(dtype).unsqueeze(-1) * a.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ h
    post, comb, x = hyper_mix(h, w, "mlp", layout)
    m = moe(_norm(x, w, "mlp_norm", layout), w, layout, ids=ctx.get("ids"))
    return post.to(dtype).unsqueeze(-1) * m.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ h


def _norm(x: torch.Tensor, w: dict, role: str, layout: Layout) -> torch.Tensor:
    return layer_norm(x, w[role], w.get(role + "_bias"), layout.eps, layout) if role in w else x


def decoder_layer(h: torch.Tensor, w: dict, layout: Layout, rope: tuple | None, mask: torch.Tensor,
                  layer: int | None = None, ctx: dict | None = None) -> torch.Tensor:
    """One block, driven by which norms the spec has: pre-norm (``attn_norm``, ``mlp_norm``),
    sandwich (Gemma: also ``post_attn_norm``, ``post_mlp_norm``), post-norm (OLMo2: only the
    post norms), or parallel residual (GPT-NeoX: h + attn(ln1 h) + mlp(ln2 h)); a layer with
    only a token mixer or only an MLP (Nemotron-H's blocks) runs that one. ``layer`` and
    ``ctx`` (what one stream carries across layers: Gemma 4's per-layer inputs ``ple`` [B, T,
    layers, size] and shared keys and values ``kv``) for the families whose layers need them."""
    if layer is not None:
        layout = layout.at(layer)
    w = logical(layout, w)
    block = layout.spec.block
    if block.hyper is not None:   # DeepSeek-V4: hyper-connected streams
        return hyper_layer(h, w, layout, rope, mask, layer, ctx)
    res = layout.value(block.residual_multiplier, 1.0)
    if "o" in w or "lin_out" in w:   # a token mixer (not on Nemotron-H's MLP-only layers)
        x = _norm(h, w, "attn_norm", layout)
        mixer = linear_attention(x, w, layout) if "lin_out" in w else attention(x, w, layout, rope, mask, layer, ctx)
        a = _norm(mixer, w, "post_attn_norm", layout)
        if layout.value(block.parallel_residual, False):   # shared_norm: the MLP reads attn_norm too (Cohere, Phi)
            return h + (mlp(x if block.shared_norm else _norm(h, w, "mlp_norm", layout), w, layout) + a)
        h = h + (a * res if res != 1.0 else a)
    if "down" in w or "router" in w:   # an MLP (not on Nemotron-H's mixer-only layers)
        x = _norm(h, w, "mlp_norm", layout)
        if "router" in w and layout.spec.moe.parallel_dense:   # Gemma 4: the dense MLP and the experts
            m = _norm(one_mlp(x, w, layout), w, "post_dense_norm", layout) + \
                _norm(moe(_norm(h, w, "expert_norm", layout), w, layout, routed_on=h), w, "post_expert_norm", layout)
        else:
            m = mlp(x, w, layout)
        m = _norm(m, w, "post_mlp_norm", layout)
        h = h + (m * res if res != 1.0 else m)
    if "ple_gate" in w:   # Gemma 4: this layer's per-layer input, gated by h
        g = activation(layout)(linear(h, w, "ple_gate")) * ctx["ple"][:, :, layer]
        h = h + _norm(linear(g, w, "ple_proj"), w, "ple_norm", layout)
    if "layer_scalar" in w:
        h = h * w["layer_scalar"]
    return h


def per_layer_inputs(h: torch.Tensor, rows: torch.Tensor, projection: torch.Tensor, norm: torch.Tensor,
                     layout: Layout) -> torch.Tensor:
    """Gemma 4's per-layer inputs [B, T, layers, size] from the scaled embeddings h, the probe
    tokens' rows of the per-layer embedding table and its projection and norm."""
    size = layout.ple_size
    looked_up = (rows * torch.tensor(size ** 0.5, dtype=rows.dtype)).unflatten(-1, (layout.layers, size))
    projected = (F.linear(h, projection.to(h.dtype)) * layout.hidden ** -0.5).unflatten(-1, (layout.layers, size))
    projected = layer_norm(projected, norm, None, layout.eps, layout)
    return (projected + looked_up.to(h.dtype)) * 2.0 ** -0.5


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


_widened_rows = threading.local()


def _widened(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows.to(dtype)`` in this thread's reused buffer (valid until its next call). For the
    head's blocks: fresh 8 MiB conversions there fragmented the heap, 50-70 MB of peak RSS."""
    buf = getattr(_widened_rows, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < rows.numel():
        buf = _widened_rows.buf = torch.empty(rows.numel(), dtype=dtype)
    return buf[:rows.numel()].view(rows.shape).copy_(rows)


def final_logits(h: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, layout: Layout,
                 chunk_rows: int = 1024, norm_bias: torch.Tensor | None = None,
                 head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits, computing with the head a block of vocab rows at a time (cast to h's dtype).

    ``norm_weight=None``: h is already normalised. ``head_bias``: the head's bias for
    these rows (Phi's lm_head)."""
    x = h if norm_weight is None else layer_norm(h, norm_weight, norm_bias, layout.eps, layout)
    def rows(i: int) -> torch.Tensor:
        block = head[i:i + chunk_rows]
        return block if block.dtype == x.dtype else _widened(block, x.dtype)

    return torch.cat([postprocess_logits(F.linear(x, rows(i),
                                                  None if head_bias is None else
                                                  head_bias[i:i + chunk_rows].to(x.dtype)), layout)
                      for i in range(0, head.shape[0], chunk_rows)], dim=-1)
