"""A Llama 3 written to torchtitan's naming and rotary convention (tests only).

torchtitan's ``Transformer``: ``tok_embeddings``, ``layers.N.attention.wq/wk/wv/wo``,
``attention_norm``, ``feed_forward.w1/w2/w3``, ``ffn_norm``, ``norm``, ``output``; RoPE by
complex multiplication of interleaved pairs (2i, 2i+1), where Hugging Face's Llama pairs
(i, i + d/2). ``from_hf`` converts a ``LlamaForCausalLM``'s weights (the row permutation
torchtitan's own HF converter applies), so the two compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cis(head_dim: int, length: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return torch.polar(torch.ones(length, head_dim // 2), torch.outer(torch.arange(length).float(), freqs))


def apply_rotary_emb(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:   # x [B, T, H, D]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cis), apply_rotary_emb(k, cis)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.wo((att @ v).transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, heads, kv_heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(c.hidden_size, c.num_attention_heads,
                                                              c.num_key_value_heads, c.intermediate_size,
                                                              c.rms_norm_eps)
                                     for i in range(c.num_hidden_layers)})
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cis = rope_cis(self.head_dim, ids.shape[1], self.theta)
        h = self.tok_embeddings(ids)
        for layer in self.layers.values():
            h = layer(h, cis)
        return self.output(self.norm(h))


def interleave_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary rows (i, i + d/2) per head -> torchtitan's (2i, 2i + 1)."""
    d = w.shape[0] // heads
    return w.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def from_hf(hf_model) -> Transformer:
    c = hf_model.config
    model = Transformer(c)
    sd = hf_model.state_dict()
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in parts.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    new = {}
    for ours, theirs in names.items():
        w = sd[theirs]
        if ours.endswith("attention.wq.weight"):
            w = interleave_rows(w, c.num_attention_heads)
        elif ours.endswith("attention.wk.weight"):
            w = interleave_rows(w, c.num_key_value_heads)
        new[ours] = w.clone()
    model.load_state_dict(new)
    return model
