"""Fixtures: tiny checkpoints, all from one builder (``build``).

``build`` makes a checkpoint folder of any family, either with transformers' own classes
(``via="transformers"``: the model is instantiated and saved by ``save_pretrained``) or as
synthetic tensors written directly with safetensors (``via="synthetic"``: names and shapes
from wisca's architecture spec, any size, no transformers). Most checkpoints then get
random, function-preserving rescalings of their symmetries (``skew``), so their weight
pattern is far from balanced, like a checkpoint deep into training, while they still
compute exactly what the freshly initialised model computed.

The named fixtures and functions the tests use are thin wrappers over ``build``:
``ckpt_dir`` (the base families in ``FAMILIES``, skewed by ``unbalance``), ``arch_ckpt``
(every family in ``ARCH_FAMILIES``, skewed through the spec by ``apply_scales``) and
``synthetic_llama``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _map_unmapped_causal_lms() -> None:
    """transformers 5.25 ships ``Mistral4ForCausalLM`` but leaves it out of AutoModelForCausalLM's
    mapping (Mistral 4 is released inside a multimodal model); the tests build and load it
    through the auto class like every family, so its own class is mapped here."""
    try:
        from transformers import AutoModelForCausalLM, Mistral4Config, Mistral4ForCausalLM
    except ImportError:
        return
    if Mistral4Config not in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM.register(Mistral4Config, Mistral4ForCausalLM, exist_ok=True)


_map_unmapped_causal_lms()
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_checkpoints" / "tiny-gqa-llama"

# -- families: name -> (model_type, config overrides) --------------------------------------------
# The tiny config every transformers-built checkpoint starts from (``make_config``).
BASE_CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                   max_position_embeddings=128, tie_word_embeddings=False, head_dim=16)
FAMILIES = {
    # the base families (tests/test_transform.py): overrides on BASE_CONFIG
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
}
# every other decoder family (tests/test_architectures.py): overrides on BASE_CONFIG + ARCH_BASE
ARCH_BASE = dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Granite 4's Mamba2 sizes shared by both of its fixtures (8 heads of 16 = 2 x hidden, state 8)
GRANITE_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, shared_intermediate_size=48)
ARCH_FAMILIES = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "phi3": ("phi3", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True)),
    # OLMoE: QK-norm over the whole projection (q_norm [H*d]), softmax-then-top-k router
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    # gpt-oss: experts fused on disk ([E, H, 2I], gate/up interleaved, biases), attention sinks,
    # sliding / full layers, router with a bias, YaRN RoPE (its default)
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, sliding_window=8)),
    "gemma2": ("gemma2", dict(sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16)),
    "olmo2": ("olmo2", {}),
    # OLMo 3: OLMo 2 with sliding-window layers (three in four) and RoPE parameters per layer type
    "olmo3": ("olmo3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "granite": ("granite", dict(embedding_multiplier=12.0, attention_multiplier=0.125,
                                residual_multiplier=0.25, logits_scaling=4.0)),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0])),
    # None drops a BASE_CONFIG / ARCH_BASE key (GPT-NeoX and GPT-2 have neither head_dim nor kv heads)
    "gpt_neox": ("gpt_neox", dict(head_dim=None, num_key_value_heads=None, rotary_pct=0.5)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=None, head_dim=None,
                          num_key_value_heads=None, tie_word_embeddings=True)),
    # parallel block on one LayerNorm (no bias), interleaved rotary, logit_scale; Command R+'s per-head QK-norm
    "cohere": ("cohere", dict(logit_scale=0.25)),
    "cohere-qknorm": ("cohere", dict(use_qk_norm=True, tie_word_embeddings=True)),
    # Phi-2: parallel block on one LayerNorm, partial rotary, GELU fc1/fc2, biases everywhere, lm_head bias
    "phi": ("phi", dict(partial_rotary_factor=0.5)),
    "phi-qknorm": ("phi", dict(partial_rotary_factor=0.5, qk_layernorm=True, tie_word_embeddings=True)),
    # GELU c_fc/c_proj with biases, LayerNorm, GQA attention with biases, sliding window
    "starcoder2": ("starcoder2", dict(sliding_window=8)),
    # MLA (q and kv latents, one rope key shared by all heads, interleaved rope), dense layer 0,
    # then sigmoid routing with group-limited top-k, a correction bias, routed_scaling_factor
    "deepseek_v3": ("deepseek_v3", dict(head_dim=None, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        n_group=2, topk_group=1, first_k_dense_replace=1)),
    # Mistral 4: DeepSeek-V3's MLA and experts, a softmax router with group-limited top-k, q scaled per
    # position (llama_4_scaling_beta; a short original_max_position_embeddings so that it acts), YaRN
    "mistral4": ("mistral4", dict(head_dim=None, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
                                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, n_shared_experts=1,
                                  rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                       original_max_position_embeddings=16, beta_fast=32.0,
                                                       beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0,
                                                       llama_4_scaling_beta=0.1))),
    # no q latent (q_proj), rotate_half YaRN rope (mscale on cos/sin and the softmax scale), biases on
    # kv_a and o, two shared experts, one group
    "deepseek_v3-plain": ("deepseek_v3", dict(head_dim=None, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=24,
                                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                              rope_interleave=False, rope_parameters=dict(
                                                  rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                                  mscale_all_dim=0.7, original_max_position_embeddings=16),
                                              attention_bias=True, n_routed_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                                              n_group=1, topk_group=1, norm_topk_prob=False,
                                              first_k_dense_replace=0)),
    # GLM-4.5: partial rotary (0.5), q/k/v biases, per-head QK-norm, the same router as DeepSeek-V3
    "glm4_moe": ("glm4_moe", dict(attention_bias=True, use_qk_norm=True, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                  first_k_dense_replace=1)),
    # Llama 4: layer 0 RoPE (interleaved, chunked attention, L2 QK-norm after RoPE: no qk there) and MoE
    # (sigmoid top-1 weighting the expert's input, experts fused on disk [E, H, 2I] / [E, I, H], a shared
    # expert), layer 1 NoPE (attention temperature tuning, small floor_scale so it acts) and a dense MLP of
    # intermediate_size_mlp; -noqknorm: RoPE on layer 1 without QK-norm (qk per rotary pair), q/k/v/o
    # biases, MoE on layer 1 by interleave_moe_layer_step, top-2
    "llama4": ("llama4_text", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=24,
                                   intermediate_size_mlp=48, no_rope_layers=[1, 0], moe_layers=[0],
                                   attention_chunk_size=8, floor_scale=4, attn_scale=0.5)),
    "llama4-noqknorm": ("llama4_text", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                                            intermediate_size_mlp=48, no_rope_layers=[0, 1], interleave_moe_layer_step=2,
                                            use_qk_norm=False, attention_bias=True, attention_chunk_size=8,
                                            floor_scale=4, attn_scale=0.5)),
    # Qwen3-Next: a Gated DeltaNet layer (in_proj_qkvz / in_proj_ba grouped per key head, 2 key heads
    # serving 4 value heads, causal conv, gated RMSNorm) then a full-attention layer (q_proj with an
    # output gate per head, (1 + w) QK-norm, partial rotary), both with MoE MLPs and a gated shared expert
    "qwen3_next": ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                      linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                                      linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=48)),
    # Qwen3.5 (its text model): the same hybrid with separate in_proj_qkv / _z / _b / _a and dense MLPs
    "qwen3_5": ("qwen3_5_text", dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                     linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                                     linear_conv_kernel_dim=4)),
    # Qwen3.5-MoE's text model: Qwen3.5's layers with Qwen3-Next's MoE (top-k always renormalised)
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                                             linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, shared_expert_intermediate_size=48)),
    # OLMo-hybrid: a pre-norm Gated DeltaNet layer (separate q/k/v/g/a/b projections, beta doubled, its
    # conv saved as q_conv1d / k_conv1d / v_conv1d) then a post-norm OLMo 2 attention layer (full QK-norm)
    "olmo_hybrid": ("olmo_hybrid", dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=12,
                                        linear_conv_kernel_dim=4)),
    # Granite 4 (granitemoehybrid): a Mamba2 layer (2 groups of 4 heads) then a NoPE attention layer, both
    # with MoE (top-k softmax, experts fused on disk as input_linear / output_linear) plus a shared MLP
    # (fused input_linear), Granite's multipliers; and its dense form (no experts: the shared MLP only) with RoPE
    "granitemoehybrid": ("granitemoehybrid", dict(
        GRANITE_MAMBA, layer_types=["linear_attention", "full_attention"], mamba_n_groups=2, mamba_d_conv=4,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=12.0,
        attention_multiplier=0.125, residual_multiplier=0.25, logits_scaling=4.0)),
    "granitemoehybrid-dense": ("granitemoehybrid", dict(
        GRANITE_MAMBA, layer_types=["full_attention", "linear_attention"], mamba_n_groups=1, mamba_d_conv=3,
        num_local_experts=0, position_embedding_type="rope", residual_multiplier=0.5)),
    # Nemotron-H: one sub-block per layer (its norm, then a Mamba2 mixer, NoPE attention, a relu² MLP or
    # an MoE of relu² experts with a shared one and DeepSeek's sigmoid group routing), saved as backbone.*
    "nemotron_h": ("nemotron_h", dict(
        layers_block_type=["linear_attention", "full_attention", "mlp", "moe"], num_hidden_layers=4,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=2, conv_kernel=4, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2,
        topk_group=1, routed_scaling_factor=2.0)),
    # Gemma 4 as its small models: sliding and full layers with their own head dims (per_layer_config),
    # proportional RoPE on the full ones, the last two layers reusing earlier layers' keys and values with a
    # double-wide MLP, per-layer input embeddings (PLE); and as its MoE model: the experts beside the dense
    # MLP, keys as values on the full layers (attention_k_eq_v) with one kv head there
    "gemma4": ("gemma4_text", dict(
        layer_types=["sliding_attention", "full_attention"] * 3, num_hidden_layers=6, sliding_window=8,
        global_head_dim=32, num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128)),
    "gemma4-moe": ("gemma4_text", dict(
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, global_head_dim=32,
        attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=24)),
    # DeepSeek-V4: hyper-connected streams (hc_mult 2), a sliding layer, compressed sparse layers (overlapping
    # windows of 4, the indexer's top-4) and a heavily compressed one (windows of 8), routed by a token table
    # (hash_moe) and by sqrt(softplus) scores, clamped SwiGLU experts and a shared one; saved per expert
    "deepseek_v4": ("deepseek_v4", dict(
        head_dim=32, num_key_value_heads=1, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=24, num_hidden_layers=4, hc_mult=2, hc_sinkhorn_iters=4,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=2, index_head_dim=16, index_topk=4, partial_rotary_factor=0.25, intermediate_size=None)),
    # the MoE families saved as transformers 5 holds them in memory (FUSED_ON_DISK): experts fused in
    # 3-D tensors, gate_up_proj [E, 2I, H] and down_proj [E, H, I] (2I != H, so no axis can pass for another)
    "mixtral-fused": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "qwen2_moe-fused": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe-fused": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                          norm_topk_prob=True)),
    "olmoe-fused": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "qwen3_next-fused": ("qwen3_next", dict(layer_types=["full_attention", "linear_attention"], linear_num_key_heads=1,
                                            linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                            linear_conv_kernel_dim=3, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=24, shared_expert_intermediate_size=48)),
    "qwen3_5_moe-fused": ("qwen3_5_moe_text", dict(layer_types=["linear_attention", "full_attention"],
                                                   linear_num_key_heads=2, linear_num_value_heads=4,
                                                   linear_key_head_dim=8, linear_value_head_dim=12,
                                                   linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=24, shared_expert_intermediate_size=48)),
    "deepseek_v3-fused": ("deepseek_v3", dict(head_dim=None, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
                                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                              n_group=2, topk_group=1, first_k_dense_replace=1)),
    "glm4_moe-fused": ("glm4_moe", dict(attention_bias=True, use_qk_norm=True, n_routed_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=24, n_group=2, topk_group=1,
                                        first_k_dense_replace=1)),
}
# families written with the model's in-memory names and shapes (``model.state_dict()``, as a
# training framework saves it) instead of ``save_pretrained``'s (which splits fused experts again)
FUSED_ON_DISK = {f for f in ARCH_FAMILIES if f.endswith("-fused")}   # every MoE family
# config.json of a synthetic checkpoint (``via="synthetic"``), before overrides
SYNTHETIC_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 256,
}


def family_config(family: str) -> tuple[str, dict]:
    """(model_type, config overrides on ``BASE_CONFIG``) of a family in FAMILIES or ARCH_FAMILIES."""
    if family in FAMILIES:
        return FAMILIES[family]
    if family in ARCH_FAMILIES:
        model_type, extra = ARCH_FAMILIES[family]
        return model_type, {**ARCH_BASE, **extra}
    raise KeyError(f"unknown test family {family!r}")


def make_config(model_type: str, **extra):
    """A transformers config: ``BASE_CONFIG`` with ``extra`` on top. An override of None
    drops the key (``KEEP_NONE`` excepted: GPT-2 reads n_inner None as 4 x hidden, DeepSeek
    q_lora_rank None as no q latent)."""
    from transformers import AutoConfig

    cfg = {**BASE_CONFIG, **extra}
    if model_type == "gpt2":   # GPT-2 takes its own names for these (n_embd, n_layer, ...)
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            cfg.pop(k, None)
    return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if v is not None or k in KEEP_NONE})


KEEP_NONE = ("n_inner", "q_lora_rank")


# -- the one builder --------------------------------------------------------------------------------
def build(path: Path, family: str | None = None, *, model_type: str | None = None, config: dict | None = None,
          dtype=torch.float32, via: str = "transformers", shards: int = 1, shard_size: str | None = None,
          skew: str | None = "unbalance", init: str | None = "biases", seed: int = 0, spread: float = 3.0,
          std: float = 0.05) -> Path:
    """Write a tiny checkpoint folder at ``path`` and return it.

    - ``family``: a name from FAMILIES or ARCH_FAMILIES (its model_type and config
      overrides), or None for ``model_type`` (default llama) with no family overrides;
      ``config``: more config overrides on top.
    - ``via``: ``"transformers"`` instantiates ``AutoModelForCausalLM.from_config`` (after
      ``torch.manual_seed(seed)``) on ``make_config`` and saves it with ``save_pretrained``;
      ``"synthetic"`` writes tensors named and shaped by wisca's spec for ``SYNTHETIC_CONFIG``
      plus overrides, N(0, ``std``) from a generator seeded with ``seed`` (norm weights 1),
      with safetensors' ``save_file`` and a plain config.json: no transformers needed.
    - ``dtype``: of every tensor written.
    - sharding: ``shard_size`` (transformers: ``max_shard_size``, e.g. "40KB") or ``shards``
      (synthetic: that many files of about equal size, cut in model order, so layers
      straddle files).
    - ``skew``: ``"unbalance"`` rescales the live transformers model's Q/K, V/O and up/down
      pairs by random factors (``unbalance``, before the cast to ``dtype``);
      ``"spec"`` rescales the saved tensors of every pair the family's spec lists (qk, vo,
      ffn, norm) by random powers of two with wisca's ``apply_scales``, and checks in
      transformers that the logits did not change; None leaves the weights as initialised.
      ``spread``: the log2 standard deviation of the random factors.
    - ``init`` (transformers only): perturb the fresh model before the skew so that every
      tensor's scaling is exercised: ``"biases"`` draws biases from N(0, 0.1); ``"vectors"``
      adds N(0, 0.1) to every 1-D parameter (biases, norms) and draws all-zero matrices (a
      router) from N(0, 0.02); None keeps transformers' init.
    """
    if family is not None:
        model_type, overrides = family_config(family)
    else:
        model_type, overrides = model_type or "llama", {}
    overrides = {**overrides, **(config or {})}
    if skew not in (None, "unbalance", "spec"):
        raise ValueError(f"skew must be 'unbalance', 'spec' or None, not {skew!r}")
    if init not in (None, "biases", "vectors"):
        raise ValueError(f"init must be 'biases', 'vectors' or None, not {init!r}")
    if via == "transformers":
        if shards != 1:
            raise ValueError("via='transformers' shards by shard_size, not by a shard count")
        _save_transformers(path, make_config(model_type, **overrides), dtype, shard_size, skew, init, seed, spread,
                           state_dict=family in FUSED_ON_DISK)
    elif via == "synthetic":
        if shard_size is not None or skew == "unbalance" or init == "vectors":
            raise ValueError("via='synthetic' shards by count (shards=N), and its skew is None or 'spec' "
                             "(unbalance and init need a transformers model)")
        cfg = {k: v for k, v in {**SYNTHETIC_CONFIG, "model_type": model_type, **overrides}.items()
               if v is not None}
        _save_synthetic(path, cfg, dtype, shards, seed, std)
    else:
        raise ValueError(f"via must be 'transformers' or 'synthetic', not {via!r}")
    if skew == "spec":
        skew_by_spec(path, seed, spread)
    return path


def _save_transformers(path: Path, config, dtype, shard_size, skew, init, seed, spread, state_dict=False) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if init == "biases" and name.endswith("bias"):    # they start at zero
                param.normal_(0.0, 0.1)
            elif init == "vectors" and param.dim() == 1:       # biases and norms
                param.add_(torch.randn_like(param) * 0.1)
            elif init == "vectors" and not param.any():        # a zero-initialised router
                param.normal_(0.0, 0.02)
        if init == "vectors":   # saved buffers too (DeepSeek's e_score_correction_bias starts at zero)
            saved = model.state_dict()
            for name, buf in model.named_buffers():
                if name in saved and buf.is_floating_point():
                    buf.add_(torch.randn_like(buf) * 0.1)
                elif name.endswith("tid2eid"):   # DeepSeek-V4's token -> experts table starts at zero
                    buf.copy_(torch.stack([torch.randperm(int(getattr(config, "n_routed_experts")))[:buf.shape[1]]
                                           for _ in range(buf.shape[0])]))
    if skew == "unbalance":
        unbalance(model, seed, spread)
    model = model.to(dtype)
    if state_dict:   # the in-memory layout, one file (no tied families here)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
        config.save_pretrained(path)
        return
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def _save_synthetic(path: Path, cfg: dict, dtype, shards: int, seed: int, std: float) -> None:
    from safetensors.torch import save_file

    from wisca_cli.spec import INDEX_ROLES, expected_shapes, layout_from_config

    layout = layout_from_config(cfg)
    spec = layout.spec
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    ones = lambda *s: torch.ones(*s, dtype=dtype)  # noqa: E731
    # model order: embedding, final norm, lm_head, then each layer's norms and its other tensors
    t = {spec.embed: rnd(layout.vocab, layout.hidden), spec.final_norm: ones(layout.hidden)}
    if not layout.tie_embeddings:
        t[spec.lm_head] = rnd(layout.vocab, layout.hidden)
    if layout.ple_size:   # Gemma 4's per-layer input embeddings
        ple, width = spec.per_layer_input, layout.layers * layout.ple_size
        t.update({ple.embed: rnd(int(layout.value(ple.vocab)), width), ple.projection: rnd(width, layout.hidden),
                  ple.norm: ones(layout.ple_size)})
    if spec.block.hyper is not None:   # DeepSeek-V4's hyper head
        n, hyper = layout.streams, spec.block.hyper
        t.update({hyper.head_fn: rnd(n, n * layout.hidden), hyper.head_base: rnd(n), hyper.head_scale: ones(1)})
    for i in range(layout.layers):
        shapes = expected_shapes(layout, i)
        roles = layout.layer_roles(i)
        norms = {name for role, name in roles.items() if role.endswith("norm")}
        tables = {name for role, name in roles.items() if role in INDEX_ROLES}
        t.update({name: ones(*shapes[name]) for name in shapes if name in norms})
        t.update({name: torch.randint(0, max(layout.experts, 1), shapes[name], generator=g)
                  for name in shapes if name in tables})
        t.update({name: rnd(*shapes[name]) for name in shapes if name not in norms | tables})
    path.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    else:
        total, done, weight_map, groups = sum(v.nbytes for v in t.values()), 0, {}, [{} for _ in range(shards)]
        for name, v in t.items():
            groups[min(shards - 1, (done + v.nbytes // 2) * shards // total)][name] = v
            done += v.nbytes
        groups = [group for group in groups if group]
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, path / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in group})
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))


@torch.no_grad()
def unbalance(model, seed: int = 0, spread: float = 3.0) -> None:
    """Rescale every Q/K, V/O and up/down pair by random factors: same function, skewed pattern."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    rand = lambda *shape: torch.exp2(torch.randn(*shape, generator=g) * spread)  # noqa: E731
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        s = rand(kv, d // 2).repeat(1, 2)                       # rotate_half pairs share a scale
        att.q_proj.weight.mul_(s.repeat_interleave(group, 0).reshape(-1, 1))
        att.k_proj.weight.div_(s.reshape(-1, 1))
        if att.q_proj.bias is not None:
            att.q_proj.bias.mul_(s.repeat_interleave(group, 0).reshape(-1))
            att.k_proj.bias.div_(s.reshape(-1))
        t = rand(kv, d)
        att.v_proj.weight.mul_(t.reshape(-1, 1))
        if att.v_proj.bias is not None:
            att.v_proj.bias.mul_(t.reshape(-1))
        att.o_proj.weight.div_(t.repeat_interleave(group, 0).reshape(1, -1))
        u = rand(mlp.up_proj.weight.shape[0])
        mlp.up_proj.weight.mul_(u.reshape(-1, 1))
        mlp.down_proj.weight.div_(u.reshape(1, -1))


def skew_by_spec(path: Path, seed: int = 0, spread: float = 3.0) -> None:
    """Rescale every symmetry the family's spec lists (qk, vo, ffn, norm, with the final norm ->
    lm_head of an untied model) by random powers of two, in the saved files. Logits before and after are compared in transformers (equal, or
    within 1e-5 where the spec says the target rounds), so the symmetries are checked
    independently of wisca's own verifier."""
    from safetensors.torch import load_file, save_file

    from wisca_cli.balance import apply_scales
    from wisca_cli.pairs import final_pairs, layer_pairs
    from wisca_cli.spec import layout_from_config

    ids = probe_tokens()
    before = hf_logits(path, ids)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors, file_of = {}, {}
    for f in files:
        loaded = load_file(path / f)
        tensors.update(loaded)
        file_of.update(dict.fromkeys(loaded, f))
    layout = layout_from_config(json.loads((path / "config.json").read_text()), tensor_names=tensors)
    g = torch.Generator().manual_seed(seed)
    for layer in range(layout.layers):
        names = layout.layer_roles(layer)
        w = {role: tensors[n] for role, n in names.items()}
        for pair in layer_pairs(layout, layer, layout.spec.targets, "channel"):
            s = torch.exp2(torch.round(torch.randn(pair.n_units, generator=g) * spread)).double()
            w.update(apply_scales(pair, w, s))
        tensors.update({names[r]: t.contiguous() for r, t in w.items()})
    spec = layout.spec   # the final norm -> lm_head (untied embeddings only)
    names = {"norm": spec.final_norm, "norm_bias": spec.final.norm_bias, "head": spec.lm_head}
    for pair in final_pairs(layout, spec.targets, "channel"):
        s = torch.exp2(torch.round(torch.randn(pair.n_units, generator=g) * spread)).double()
        w = apply_scales(pair, {m.role: tensors[names[m.role]] for m in pair.members}, s)
        tensors.update({names[r]: t.contiguous() for r, t in w.items()})
    for f in files:
        save_file({n: t for n, t in tensors.items() if file_of[n] == f}, path / f, metadata={"format": "pt"})
    after = hf_logits(path, ids)
    if layout.spec.inexact_targets:
        assert (after - before).abs().max() <= 1e-5 * before.abs().max(), path
    else:
        assert torch.equal(before, after), f"{path}: unbalancing changed the function"


def synthetic_llama(path: Path, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=128,
                    dtype=torch.float32, seed=0, std=0.05, shards: int = 1) -> Path:
    """A llama checkpoint written directly with safetensors (no transformers), any size.
    ``shards > 1`` cuts the tensors, in model order, into shards of about equal size, so
    layers straddle shard files."""
    return build(path, via="synthetic", model_type="llama", dtype=dtype, seed=seed, std=std, shards=shards,
                 skew=None, init=None, config=dict(hidden_size=hidden, intermediate_size=inter,
                                                   num_hidden_layers=layers, num_attention_heads=heads,
                                                   num_key_value_heads=kv_heads, vocab_size=vocab))


# -- helpers ----------------------------------------------------------------------------------------
def probe_tokens(vocab: int = 128, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """wisca's streamed reference forward on a checkpoint, stage by stage as verification
    runs it (fp32 here), for comparison with transformers' own forward."""
    from wisca_cli import stream
    from wisca_cli.checkpoint import open_checkpoint
    from wisca_cli.verifier import StreamVerifier, Tolerance

    src = path
    ckpt = open_checkpoint(src)
    try:
        lay = ckpt.layout
        v = StreamVerifier(lay, ids, exact=True, tolerance=Tolerance())
        *stages, final = stream._stages(ckpt)
        for stage in stages:   # the one model as both: its tensors whole, the big ones as one block each
            t = {role: ckpt.read(name) for role, name in stage.names.items()}
            stream._feed_verifier(v, stage.kind, stage.layer, t, t, [(r, [(0, t[r], t[r])]) for r in stage.streamed])
        t = {role: ckpt.read(name) for role, name in final.names.items()}
        v.final_norm(t["norm"], t["norm"], t, t)   # by hand: the logits themselves, not their comparison
        v.head_rows(t["head"], t["head"])
        return torch.cat(v.logits_ref, -1)
    finally:
        ckpt.close()


@torch.no_grad()
def eval_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A live model's logits in eval mode (no dropout), leaving it in train mode."""
    model.eval()
    out = model(ids, use_cache=False).logits   # no cache: transformers 5.25's Nemotron-H cache fails on a Mamba first layer
    model.train()
    return out


@torch.no_grad()
def hf_logits(path: Path, ids: torch.Tensor, dtype=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                 **({"dtype": dtype} if dtype else {}))
    model.eval()
    return model(ids, use_cache=False).logits   # as eval_logits


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def dcp_llama(path: Path, steps: int = 1, flatten: bool = True) -> Path:
    """A torch.distributed checkpoint of a skewed tiny GQA Llama and its AdamW state, saved in
    one process ({"model": ..., "optimizer": ...}, as an FSDP2 loop does), with config.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = make_config("llama", num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        unbalance(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=options)},
             checkpoint_id=path)
    cfg.to_json_file(str(path / "config.json"))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m wisca_cli ARGS` the way a user or CI would."""
    return subprocess.run([sys.executable, "-m", "wisca_cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- session fixtures: each checkpoint built once -----------------------------------------------------
@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """(family, dtype, shard_size) -> a checkpoint of a FAMILIES family, skewed by ``unbalance``."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype=torch.float32, shard_size=None) -> Path:
        key = (family, dtype, shard_size)
        if key not in cache:
            name = f"{family}-{str(dtype).split('.')[-1]}" + ("-sharded" if shard_size else "")
            cache[key] = build(tmp_path_factory.mktemp("ckpt") / name, family, dtype=dtype, shard_size=shard_size,
                               skew="unbalance", init="biases")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def arch_ckpt(tmp_path_factory):
    """family -> a tiny fp32 checkpoint of an ARCH_FAMILIES family, skewed through its spec."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build(tmp_path_factory.mktemp("arch") / family, family, skew="spec", init="vectors")
        return cache[family]

    return get
