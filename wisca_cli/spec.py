"""Architecture specs: what a model family's checkpoint looks like, as data.

Each family is one small JSON file in ``architectures/``: tensor names by role, the
norm and MLP kind, the rotary style, and the WISCA targets that apply. A file states
only what differs from the family it ``extends`` (merged key by key, see ``merge``).
The files are parsed into small frozen objects (``ArchSpec`` and its sections), every
key and value type checked when the specs are first loaded. ``Layout`` combines a spec
with a checkpoint's ``config.json`` into the numbers the math needs (heads, kv heads,
head dim, ...). Nothing here reads tensors.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from . import fp8, mxfp4
from .errors import WiscaError

SPEC_TARGETS = ("qk", "vo", "ffn", "norm", "conv")  # the symmetries pairs.py builds
# the roles of a Gated DeltaNet token mixer (``linear_attention``): its input projections
# (q, k, v, the output gate z, beta's b and the decay's a), the depthwise causal conv over
# q|k|v, the decay's dt_bias and A_log, the gated RMSNorm's weight and the output projection
LINEAR_ROLES = ("lin_q", "lin_k", "lin_v", "lin_z", "lin_b", "lin_a", "lin_conv", "lin_dt_bias", "lin_A_log",
                "lin_norm", "lin_out")
# a Mamba2 mixer's roles: in_proj [z | x B C | dt] rows, the conv over x B C (its bias optional),
# the per-head dt bias, A and D, the gated grouped RMSNorm's weight, out_proj
MAMBA_ROLES = ("lin_in", "lin_conv", "lin_conv_bias", "lin_dt_bias", "lin_A_log", "lin_D", "lin_norm", "lin_out")
MIXER_ROLES = {"gated_deltanet": LINEAR_ROLES, "mamba2": MAMBA_ROLES}
# logical roles a fused tensor may hold (a shared expert's gate and up: Granite's shared_mlp.input_linear)
FUSABLE_PARTS = ("q", "k", "v", "gate", "up", "shared.gate", "shared.up", *LINEAR_ROLES[:6])
# layer type names of older config.json files -> transformers 5's (configuration_utils.
# _LEGACY_LAYER_TYPE_REMAP, applied to every config it loads): Granite 4.0-H says mamba / attention
LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
CONV_PARTS = ("lin_conv_q", "lin_conv_k", "lin_conv_v")   # lin_conv saved in parts (conv_split)
# the roles of an attention block, absent from a layer whose token mixer is a linear attention
ATTENTION_ROLES = ("q", "k", "v", "o", "qkv", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias", "o_bias",
                   "qkv_bias", "q_norm_bias", "k_norm_bias", "sinks")
KV_SHARED_WHY = ("its keys are shared across layers (num_kv_shared_layers): one layer's k_norm meets the "
                 "queries of several layers, so a scale of it is not undone by one q_norm")
INDEX_ROLES = ("router_table",)   # integer tensors a layer holds (DeepSeek-V4's token -> experts): copied
KV_ROLES = ("k", "v", "k_norm", "k_bias", "v_bias", "k_norm_bias")   # absent where a layer reuses keys and values
MLP_ROLES = ("gate", "up", "down")                   # roles of one MLP: dense, each expert, shared
NOT_INHERITED = ("name", "model_types")              # every file states its own
OWN_ONLY = ("refused_model_types",)                  # optional, and never inherited


# -- value checks ----------------------------------------------------------------------------
# A check takes (value, where, path, partial) and returns the value as the spec object holds
# it. ``partial``: the value comes from one file before merging (a null removes a key).
Check = Callable[[Any, str, str, bool], Any]


def _bad(where: str, path: str, want: str, value: Any) -> WiscaError:
    return WiscaError(f"{where}: {path} must be {want}, got {json.dumps(value)}")


def _string(value, where, path, partial):
    if not isinstance(value, str) or not value:
        raise _bad(where, path, "a non-empty string", value)
    return value


def _boolean(value, where, path, partial):
    if not isinstance(value, bool):
        raise _bad(where, path, "true or false", value)
    return value


def _flag(value, where, path, partial):
    """true / false, or a config.json key holding one."""
    if not isinstance(value, bool) and not (isinstance(value, str) and value):
        raise _bad(where, path, "true, false or a config key", value)
    return value


def _flags(value, where, path, partial):
    """A flag (``_flag``), or a non-empty list of config keys that must all be set."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise _bad(where, path, "true, false, a config key or a non-empty list of config keys", value)
        return tuple(value)
    return _flag(value, where, path, partial)


def _number(value, where, path, partial):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, path, "a number", value)
    return float(value)


def _positive_int_value(value, where, path, partial):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(where, path, "a positive integer", value)
    return value


def _config_value(value, where, path, partial):
    """A config.json key, or a literal number (``Layout.value`` reads both)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or (isinstance(value, str) and value)):
        raise _bad(where, path, "a config key or a number", value)
    return value


def _scalar(value, where, path, partial):
    """A JSON number, string or bool (a config value)."""
    if not isinstance(value, (bool, int, float, str)):
        raise _bad(where, path, "a number, a string or true/false", value)
    return value


def _choice(*options: str) -> Check:
    def check(value, where, path, partial):
        if value not in options:
            raise _bad(where, path, "one of " + ", ".join(json.dumps(o) for o in options), value)
        return value
    return check


def _str_list(choices: tuple[str, ...] | None = None, nonempty: bool = False) -> Check:
    def check(value, where, path, partial):
        want = ("a non-empty " if nonempty else "a ") + "list of " + \
            ("names from: " + ", ".join(choices) if choices else "strings")
        if not isinstance(value, list) or (nonempty and not value):
            raise _bad(where, path, want, value)
        for item in value:
            if not isinstance(item, str) or not item or (choices and item not in choices):
                raise _bad(where, path, want, value)
        if len(set(value)) != len(value):
            raise _bad(where, path, "a list without repeats", value)
        return tuple(value)
    return check


def _mapping(item: Check) -> Check:
    """An object of name -> item (a null item in a file removes the inherited one)."""
    def check(value, where, path, partial):
        if not isinstance(value, dict):
            raise _bad(where, path, "an object", value)
        out = {}
        for key, v in value.items():
            if v is None and partial:
                continue
            out[key] = item(v, where, f"{path}.{key}", partial)
        return MappingProxyType(out)
    return check


def _section(cls: type) -> Check:
    def check(value, where, path, partial):
        return _build(cls, value, where, path, partial)
    return check


def _no_entries() -> Mapping:
    return MappingProxyType({})


def _spec_field(check: Check, default: Any = MISSING, factory: Any = MISSING) -> Any:
    return field(default=default, default_factory=factory, metadata={"check": check})


def _build(cls: type, data: Any, where: str, path: str, partial: bool, also: tuple[str, ...] = ()):
    """Check an object against a section class; build it (``partial``: only check).
    ``also``: keys allowed beside the fields (and left out of the object)."""
    label = path or "the spec"
    if not isinstance(data, dict):
        raise _bad(where, label, "an object", data)
    known = [f.name for f in fields(cls)] + list(also)
    for key in data:
        if key not in known:
            raise WiscaError(f"{where}: unknown key {key!r} in {label} (known: {', '.join(known)})")
    values = {}
    for f in fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if data.get(f.name) is None:
            if not partial and f.default is MISSING and f.default_factory is MISSING:
                raise WiscaError(f"{where}: missing key {f.name!r} in {label}")
            continue
        values[f.name] = f.metadata["check"](data[f.name], where, sub, partial)
    if partial:
        return None
    obj = cls(**values)
    obj.check(where, label)
    return obj


class _Section:
    """Base of the spec sections: frozen dataclasses, checked when built.

    ``get`` / ``[]``: the dict-style reads of the spec's former raw dicts
    (``spec.final.get("norm_bias")``), kept for callers not yet on attributes."""

    def check(self, where: str, label: str) -> None:
        """Constraints across fields (a section overrides it)."""

    def get(self, key: str, default: Any = None) -> Any:
        value = self[key]
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


# -- the spec objects ------------------------------------------------------------------------
@dataclass(frozen=True)
class NormSpec(_Section):
    eps: str = _spec_field(_string)                                  # config key of the epsilon
    kind: str = _spec_field(_choice("rms", "layernorm"), "rms")
    weight_offset: float = _spec_field(_number, 0.0)                 # 1.0: Gemma's (1 + w)
    fp32_weight: bool = _spec_field(_boolean, False)   # RMSNorm: w times the normed x in float32, then cast (Nemotron-H)


@dataclass(frozen=True)
class AttentionScale(_Section):
    inv_sqrt: str | float | None = _spec_field(_config_value, None)  # scale = value ** -0.5
    value: str | float | None = _spec_field(_config_value, None)     # scale = value

    def check(self, where: str, label: str) -> None:
        if (self.inv_sqrt is None) == (self.value is None):
            raise WiscaError(f"{where}: {label} must have exactly one of inv_sqrt, value")


@dataclass(frozen=True)
class PositionScale(_Section):
    """Mistral 4's query scale by position (transformers' ``get_llama_4_attn_scale``): q times
    ``1 + beta * log(1 + floor(position / max))``, cast to q's dtype first; config keys
    (dotted paths reach into a dict, e.g. ``rope_parameters.llama_4_scaling_beta``)."""
    beta: str | float = _spec_field(_config_value)
    max: str | float = _spec_field(_config_value)


@dataclass(frozen=True)
class AttentionTemperature(_Section):
    """Llama 4's attention temperature tuning on NoPE layers: q times
    ``log1p(floor((position + 1) / floor)) * scale + 1``, when the config flag ``when`` is set."""
    when: bool | str = _spec_field(_flag)
    floor: str | float = _spec_field(_config_value)                  # floor_scale
    scale: str | float = _spec_field(_config_value)                  # attn_scale


@dataclass(frozen=True)
class MlaSpec(_Section):
    """Multi-head latent attention (DeepSeek-V2/V3): config keys of its sizes. Queries come
    from ``q_a`` -> ``q_a_norm`` -> ``q_b`` (or ``q`` when the q LoRA rank is null); ``kv_a``
    makes the latent (``kv_a_norm`` -> ``kv_b``: per head k_nope rows, then v rows) and one
    rope key shared by all heads (its last ``qk_rope_head_dim`` rows)."""
    q_lora_rank: str = _spec_field(_string)
    kv_lora_rank: str = _spec_field(_string)
    qk_nope_head_dim: str = _spec_field(_string)
    qk_rope_head_dim: str = _spec_field(_string)
    v_head_dim: str = _spec_field(_string)
    latent_eps: str | float = _spec_field(_config_value)             # eps of q_a_norm and kv_a_norm


@dataclass(frozen=True)
class LayerDims(_Section):
    """Head dim and kv heads per layer (Gemma 4): config.json's ``key`` (``per_layer_config``: layer
    index -> {head_dim, num_key_value_heads}); without it, as transformers' config class fills it
    in, the layers of type ``layer_type`` get ``head_dim`` (a config key, ``head_dim_default``
    when absent) and, where the config flag ``kv_heads_when`` is set, ``kv_heads`` kv heads."""
    key: str = _spec_field(_string)
    layer_type: str = _spec_field(_string)
    head_dim: str = _spec_field(_string)
    head_dim_default: int = _spec_field(_positive_int_value)
    kv_heads: str = _spec_field(_string)
    kv_heads_when: str = _spec_field(_string)


@dataclass(frozen=True)
class CompressedAttentionSpec(_Section):
    """DeepSeek-V4's attention (``forward.compressed_attention``): one kv head that is both keys and
    values, q through a latent (``q_a`` -> ``q_a_norm`` -> ``q_b``, then a weightless RMSNorm per head),
    RoPE on the trailing dims (undone on the output), per-head sinks, a grouped low-rank output
    (``o_a`` per group of heads, then ``o_b``); on the layers of type ``sparse_type`` and ``heavy_type``
    the keys also hold compressed entries (``compressor``: a softmax-gated sum over windows of
    ``rates[type]`` tokens, overlapping windows on ``sparse_type`` layers), and on ``sparse_type``
    layers an indexer (``indexer``) picks each query's top ``index_topk`` of them. Config keys."""
    rates: str = _spec_field(_string)
    sparse_type: str = _spec_field(_string)
    heavy_type: str = _spec_field(_string)
    o_groups: str = _spec_field(_string)
    o_rank: str = _spec_field(_string)
    index_heads: str = _spec_field(_string)
    index_head_dim: str = _spec_field(_string)
    index_topk: str = _spec_field(_string)
    compressor: Mapping[str, str] = _spec_field(_mapping(_string))   # role -> name in a layer
    indexer: Mapping[str, str] = _spec_field(_mapping(_string))


@dataclass(frozen=True)
class HyperSpec(_Section):
    """Hyper-connections (DeepSeek-V4's mHC): the residual is ``mult`` streams; before each sub-block a
    layer's ``hc_*_fn`` / ``_base`` / ``_scale`` (config keys here, tensor roles in the layer) mix them
    into its input and its output back into them (Sinkhorn-normalised, ``iters``, ``eps``); before the
    final norm the ``head_*`` tensors (names) collapse them into one."""
    mult: str = _spec_field(_string)
    iters: str = _spec_field(_string)
    eps: str = _spec_field(_string)
    head_fn: str = _spec_field(_string)
    head_base: str = _spec_field(_string)
    head_scale: str = _spec_field(_string)


@dataclass(frozen=True)
class HashLayers(_Section):
    """MoE layers routed by a frozen token -> experts table (DeepSeek-V4's ``hash_moe``): the layers
    whose entry in the config list ``key`` is ``kind``; ``table`` (a tensor name in the layer,
    [vocab, top_k] int64) picks the experts, the router's scores still weight them."""
    key: str = _spec_field(_string)
    kind: str = _spec_field(_string)
    table: str = _spec_field(_string)


@dataclass(frozen=True)
class AttentionSpec(_Section):
    rotary: str | None = _spec_field(_choice("half", "interleaved"), None)   # None: no RoPE
    rotary_interleave: str | None = _spec_field(_string, None)       # config flag: interleaved when set
    mla: MlaSpec | None = _spec_field(_section(MlaSpec), None)       # None: q, k, v heads
    # head: one weight [d] shared by all heads; heads: one weight row per head ([H, d], [G, d]),
    # normalised per head; full: one weight [H*d] over the whole projection. Applies where
    # the layer has a q_norm tensor (an optional tensor: on with a config flag)
    qk_norm: str | None = _spec_field(_choice("head", "heads", "full"), None)
    scale: AttentionScale | None = _spec_field(_section(AttentionScale), None)  # None: head_dim ** -0.5
    softcap: str | float | None = _spec_field(_config_value, None)
    sliding_window: str | None = _spec_field(_string, None)          # config keys
    sliding_window_enabled: str | None = _spec_field(_string, None)
    rope_layers: str | None = _spec_field(_string, None)             # per-layer 0/1 list (NoPE layers)
    nope_interval: str | None = _spec_field(_string, None)           # without that list: every n-th layer NoPE
    # config flag: on RoPE layers q and k are L2-normalised per head after RoPE (no weight, the
    # norm's eps): Llama 4's use_qk_norm
    qk_l2_norm: bool | str | None = _spec_field(_flag, None)
    temperature: AttentionTemperature | None = _spec_field(_section(AttentionTemperature), None)   # NoPE layers
    position_scale: PositionScale | None = _spec_field(_section(PositionScale), None)   # Mistral 4 (MLA)
    # config key: chunked attention (a query sees its own chunk's keys) on the layers whose
    # layer_types entry is "chunked_attention" (without layer_types: the RoPE layers)
    chunk_size: str | None = _spec_field(_string, None)
    head_dim_key: bool = _spec_field(_boolean, True)                 # False: config head_dim ignored
    # "heads": q_proj's rows per head are [q d | gate d]; the attention output is multiplied by
    # sigmoid(gate) before o_proj (Qwen3-Next, Qwen3.5 full-attention layers)
    output_gate: str | None = _spec_field(_choice("heads"), None)
    # config key: RoPE only where its value is "rope", NoPE otherwise (Granite 4's position_embedding_type)
    rope_when_key: str | None = _spec_field(_string, None)
    v_norm: bool = _spec_field(_boolean, False)   # v RMS-normalised per head, no weight (Gemma 4's v_norm)
    # config flag: on the layers of type ``k_eq_v_layer_type`` there is no v_proj; the values are
    # k_proj's output before k_norm (Gemma 4's attention_k_eq_v)
    k_eq_v: str | None = _spec_field(_string, None)
    k_eq_v_layer_type: str = _spec_field(_string, "full_attention")
    # config key: the last n layers reuse the keys and values of the last earlier layer of their
    # type (no k_proj, v_proj, k_norm of their own; Gemma 4's num_kv_shared_layers)
    kv_shared: str | None = _spec_field(_string, None)
    layer_dims: LayerDims | None = _spec_field(_section(LayerDims), None)   # head dim / kv heads per layer
    # layer type -> its key in config's rope_parameters, and the key of every other type (DeepSeek-V4's
    # "main" for sliding layers, "compress" for the compressed ones); without: the layer type itself
    rope_keys: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    rope_key_default: str | None = _spec_field(_string, None)
    compressed: CompressedAttentionSpec | None = _spec_field(_section(CompressedAttentionSpec), None)

    def check(self, where: str, label: str) -> None:
        if self.nope_interval and not self.rope_layers:
            raise WiscaError(f"{where}: {label}.nope_interval needs {label}.rope_layers (the list it stands in for)")


@dataclass(frozen=True)
class MlpSpec(_Section):
    # clamped (gpt-oss): (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    # limited (DeepSeek-V4): act(min(gate, limit)) * clamp(up, -limit, limit)
    kind: str = _spec_field(_choice("gated", "plain", "clamped", "limited"), "gated")
    act: str | None = _spec_field(_string, None)                     # config key (absent: silu)
    intermediate_default: int | None = _spec_field(_positive_int_value, None)   # x hidden
    alpha: str | float | None = _spec_field(_config_value, None)     # clamped: the sigmoid's gain
    limit: str | float | None = _spec_field(_config_value, None)     # clamped: the clamp
    # config flag: twice the intermediate size on the layers that reuse another's keys and values
    # (Gemma 4's use_double_wide_mlp)
    double_wide: str | None = _spec_field(_string, None)

    def check(self, where: str, label: str) -> None:
        if (self.kind == "clamped") != (self.alpha is not None and self.limit is not None) and self.kind != "limited":
            raise WiscaError(f"{where}: {label}: alpha and limit go with kind \"clamped\" (both), and only there")
        if self.kind == "limited" and (self.limit is None or self.alpha is not None):
            raise WiscaError(f"{where}: {label}: kind \"limited\" takes limit (and no alpha)")


@dataclass(frozen=True)
class BlockSpec(_Section):
    parallel_residual: bool | str = _spec_field(_flag, False)
    residual_multiplier: str | float | None = _spec_field(_config_value, None)
    shared_norm: bool = _spec_field(_boolean, False)   # parallel block on one norm: the MLP reads attn_norm
    # config key listing each layer's kind where a layer is ONE sub-block (Nemotron-H's layers_block_type:
    # its norm, then a token mixer or an MLP); read as layer_types. ``mlp_kinds``: the kinds whose block
    # is the MLP (dense or MoE), every other kind's is the token mixer (attention or linear attention)
    kinds: str | None = _spec_field(_string, None)
    mlp_kinds: tuple[str, ...] = _spec_field(_str_list(), ())
    # config key of the same list as one letter per layer, and the letters' kinds (Nemotron-H's
    # hybrid_override_pattern "M-M*-E", as released; transformers reads it when the list is absent)
    pattern: str | None = _spec_field(_string, None)
    pattern_letters: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    hyper: HyperSpec | None = _spec_field(_section(HyperSpec), None)   # hyper-connections (DeepSeek-V4)

    def check(self, where: str, label: str) -> None:
        if bool(self.pattern) != bool(self.pattern_letters) or self.pattern and not self.kinds:
            raise WiscaError(f"{where}: {label}.pattern and {label}.pattern_letters go together, with {label}.kinds")
        if bool(self.kinds) != bool(self.mlp_kinds):
            raise WiscaError(f"{where}: {label}.kinds and {label}.mlp_kinds go together")
        if self.shared_norm and self.parallel_residual is False:
            raise WiscaError(f"{where}: {label}.shared_norm needs parallel_residual (the MLP and attention "
                             f"read one norm only in a parallel block)")


EXPERT_DIMS = ("experts", "out", "in")


@dataclass(frozen=True)
class FusedExperts(_Section):
    """Every expert's weights of some MLP roles in one 3-D tensor: ``dims`` names its axes
    (``experts`` first; ``out``/``in`` as in ``W[out, in]``: gpt-oss stores ``[E, in, out]``,
    transformers 5's in-memory layout ``[E, out, in]``); several ``parts`` share the out axis,
    one after the other (``concat``) or alternating (``interleaved``: gate = [..., ::2])."""
    name: str = _spec_field(_string)                                 # tensor name in a layer
    parts: tuple[str, ...] = _spec_field(_str_list(MLP_ROLES, nonempty=True))
    dims: tuple[str, ...] = _spec_field(_str_list(EXPERT_DIMS))
    layout: str = _spec_field(_choice("concat", "interleaved"), "concat")
    bias: str | None = _spec_field(_string, None)                    # [E, out], e.g. gpt-oss

    def check(self, where: str, label: str) -> None:
        if sorted(self.dims) != sorted(EXPERT_DIMS) or self.dims[0] != "experts":
            raise WiscaError(f"{where}: {label}.dims must be \"experts\" then \"out\" and \"in\" in the "
                             f"tensor's order, got {list(self.dims)}")
        if len(self.parts) > 1 and "down" in self.parts:
            raise WiscaError(f"{where}: {label}.parts: down reads the intermediate neurons; it fuses with nothing")


@dataclass(frozen=True)
class MoeSpec(_Section):
    num_experts: str = _spec_field(_string)                          # config keys ...
    top_k: str | int = _spec_field(_config_value)
    router: str = _spec_field(_string)                               # ... and tensor names in a layer
    # role -> name with {expert} (one tensor per expert), and / or the experts fused in 3-D
    # tensors (fused role -> FusedExperts); with both, a checkpoint's tensor names decide
    expert_tensors: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    fused_experts: Mapping[str, "FusedExperts"] = _spec_field(_mapping(_section(FusedExperts)), factory=_no_entries)
    router_bias: str | None = _spec_field(_string, None)             # tensor name (gpt-oss)
    # config key: where its quant_method is "mxfp4", the fused experts may be stored as MXFP4
    # <name>_blocks / <name>_scales (uint8), copied unchanged (gpt-oss's quantization_config)
    mxfp4: str | None = _spec_field(_string, None)
    fused_router: str | None = _spec_field(_string, None)            # the router's name beside fused experts
    norm_topk: bool | str = _spec_field(_flag, False)
    intermediate: str | None = _spec_field(_string, None)            # absent: intermediate_size
    shared_intermediate: str | None = _spec_field(_string, None)
    shared_tensors: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    shared_gate: str | None = _spec_field(_string, None)
    sparse_step: str | int | None = _spec_field(_config_value, None)
    dense_layers: str | None = _spec_field(_string, None)
    dense_tensors: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    # the router: softmax over all experts (then top-k), or sigmoid scores with DeepSeek's
    # group-limited top-k (``groups``, ``topk_groups``) on scores + ``correction`` (a tensor)
    # topk_sigmoid: Llama 4; softmax_group: Mistral 4 (softmax scores, DeepSeek's group-limited top-k);
    # topk_softmax: Granite (the top-k logits, then a softmax over them)
    # scaled_softmax: Gemma 4 (the router reads h RMS-normalised without a weight, times ``router_norm``
    # and hidden ** -0.5; softmax, top-k, renormalised, times ``router_expert_scale`` of each expert)
    # sqrtsoftplus: DeepSeek-V4 (scores sqrt(softplus(logits)), top-k on scores + ``correction``, the
    # chosen scores renormalised times ``scaling``; on ``hash_layers`` the table picks the experts)
    routing: str = _spec_field(_choice("softmax", "sigmoid", "topk_sigmoid", "softmax_group", "topk_softmax",
                                       "scaled_softmax", "sqrtsoftplus"), "softmax")
    hash_layers: HashLayers | None = _spec_field(_section(HashLayers), None)
    zero_is_dense: bool = _spec_field(_boolean, False)   # num_experts 0: every layer dense (Granite 4's dense models)
    layer_kind: str | None = _spec_field(_string, None)   # MoE on the layers of this block kind (block.kinds)
    weighted_input: bool = _spec_field(_boolean, False)              # the weight scales the expert's input (Llama 4)
    moe_layers: str | None = _spec_field(_string, None)              # key of the list of MoE layers (over sparse_step)
    dense_intermediate: str | None = _spec_field(_string, None)      # the dense layers' MLP size (absent: intermediate_size)
    correction: str | None = _spec_field(_string, None)              # e_score_correction_bias
    groups: str | int | None = _spec_field(_config_value, None)
    topk_groups: str | int | None = _spec_field(_config_value, None)
    scaling: str | float | None = _spec_field(_config_value, None)   # routing weights x value
    first_dense: str | int | None = _spec_field(_config_value, None)  # layers before it are dense
    shared_count: str | None = _spec_field(_string, None)            # shared experts: intermediate x count
    # an expert's parameters in the order of its own module (one nn.Module per expert, as in
    # transformers 4.x), which positional optimizer states of per-expert moments follow
    expert_order: tuple[str, ...] = _spec_field(_str_list(MLP_ROLES, nonempty=True), MLP_ROLES)
    when: str | None = _spec_field(_string, None)   # config flag: no experts unless set (Gemma 4's enable_moe_block)
    # the dense MLP (gate, up, down in layer_tensors) stays on the MoE layers, beside the experts: h + post(post_dense(mlp(mlp_norm h)) +
    # post_expert(experts(expert_norm h))), routed on h itself (Gemma 4)
    parallel_dense: bool = _spec_field(_boolean, False)
    # role -> name of tensors on the MoE layers only (Gemma 4's router scales, the experts' norms)
    layer_tensors: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)

    def check(self, where: str, label: str) -> None:
        if not self.expert_tensors and not self.fused_experts:
            raise WiscaError(f"{where}: {label} needs expert_tensors or fused_experts")
        fused_parts = [p for f in self.fused_experts.values() for p in f.parts]
        if self.fused_experts and sorted(fused_parts) not in (sorted(MLP_ROLES), ["down", "up"]):   # gated or plain
            raise WiscaError(f"{where}: {label}.fused_experts must hold {', '.join(MLP_ROLES)} once each, "
                             f"got {fused_parts}")
        if self.expert_tensors and sorted(self.expert_order) != sorted(self.expert_tensors):
            raise WiscaError(f"{where}: {label}.expert_order must list the roles of {label}.expert_tensors "
                             f"({', '.join(self.expert_tensors)}) once each, got {list(self.expert_order)}")
        for role, name in self.expert_tensors.items():
            if "{expert}" not in name:
                raise WiscaError(f"{where}: {label}.expert_tensors.{role} must contain {{expert}}, got {name!r}")
        if self.mxfp4 and not self.fused_experts:
            raise WiscaError(f"{where}: {label}.mxfp4: MXFP4 experts are fused ones; it needs {label}.fused_experts")
        if (self.groups is None) != (self.topk_groups is None):
            raise WiscaError(f"{where}: {label}.groups and {label}.topk_groups go together")
        if self.routing not in ("sigmoid", "softmax_group") and self.groups is not None:
            raise WiscaError(f"{where}: {label}.groups need routing \"sigmoid\" or \"softmax_group\"")
        if self.routing not in ("sigmoid", "sqrtsoftplus") and self.correction:
            raise WiscaError(f"{where}: {label}.correction needs routing \"sigmoid\" or \"sqrtsoftplus\"")
        for key in ("expert_tensors", "shared_tensors", "dense_tensors"):   # gate_up: a fused tensor of the spec's
            extra = sorted(set(getattr(self, key)) - set(MLP_ROLES) - ({"gate_up"} if key != "expert_tensors" else set()))
            if extra:
                raise WiscaError(f"{where}: unknown role {extra[0]!r} in {label}.{key} (known: {', '.join(MLP_ROLES)})")


@dataclass(frozen=True)
class EmbeddingSpec(_Section):
    scale: str | float | None = _spec_field(_config_value, None)     # "sqrt_hidden" or a multiplier key
    positions: str | None = _spec_field(_string, None)               # learned positions tensor (GPT-2)
    positions_count: str | int = _spec_field(_config_value, "max_position_embeddings")
    tied_default: bool = _spec_field(_boolean, False)                # tie_word_embeddings when absent


@dataclass(frozen=True)
class FinalSpec(_Section):
    norm_bias: str | None = _spec_field(_string, None)               # tensor name (LayerNorm families)
    softcap: str | float | None = _spec_field(_config_value, None)
    logits_divisor: str | float | None = _spec_field(_config_value, None)
    logits_scale: str | float | None = _spec_field(_config_value, None)   # logits * value (Cohere)
    head_bias: str | None = _spec_field(_string, None)               # lm_head bias tensor name (Phi)


@dataclass(frozen=True)
class FusedSpec(_Section):
    parts: tuple[str, ...] = _spec_field(_str_list(FUSABLE_PARTS, nonempty=True))
    # heads: per head [q d, k d, v d]; kv_groups: per kv head, its R query heads, then k, then v;
    # key_groups: per linear-attention key head, each part's share in turn (Qwen3-Next's
    # in_proj_qkvz: [q dk | k dk | v R dv | z R dv] per key head; in_proj_ba: [b R | a R])
    layout: str = _spec_field(_choice("concat", "heads", "kv_groups", "key_groups"), "concat")

    def check(self, where: str, label: str) -> None:
        if self.layout in ("heads", "kv_groups") and self.parts != ("q", "k", "v"):
            raise WiscaError(f"{where}: {label}: layout {self.layout} holds parts [q, k, v], got {list(self.parts)}")
        if self.layout == "key_groups" and not set(self.parts) <= set(LINEAR_ROLES):
            raise WiscaError(f"{where}: {label}: layout key_groups holds linear-attention parts "
                             f"({', '.join(LINEAR_ROLES[:6])}), got {list(self.parts)}")


@dataclass(frozen=True)
class OptionalTensor(_Section):
    name: str = _spec_field(_string)                                 # name inside the layer
    when: bool | str | tuple[str, ...] = _spec_field(_flags)         # true, a config key or keys (all set)
    unless: str | None = _spec_field(_string, None)                  # absent when this config key is set


@dataclass(frozen=True)
class TargetLayers(_Section):
    """A target that holds only on some layers: with the config flag ``when`` set, only on
    the ``rope`` or the ``nope`` layers (Llama 4's qk: the L2 QK-norm on RoPE layers absorbs
    any scale of q or k); ``why`` is the report's reason for the others."""
    only: str = _spec_field(_choice("rope", "nope"))
    why: str = _spec_field(_string)
    when: bool | str = _spec_field(_flag, True)


@dataclass(frozen=True)
class NameAdapter(_Section):
    """Another framework's names for the same family (``frameworks/*.json``): the tensor
    names it replaces and, where its weights store rotary pairs differently (torchtitan's
    interleaved 2i, 2i+1 against HF's i, i + d/2), its rotary style."""
    embed: str = _spec_field(_string)
    final_norm: str = _spec_field(_string)
    lm_head: str = _spec_field(_string)
    layer_prefix: str = _spec_field(_string)
    layer_tensors: Mapping[str, str] = _spec_field(_mapping(_string))   # role -> its name there
    rotary: str | None = _spec_field(_choice("half", "interleaved"), None)   # None: the family's
    # tensors the framework stores fused where the family keeps them apart (Megatron's
    # linear_qkv and linear_fc1): fused role -> parts and row layout; they replace the parts
    # in ``layer_tensors`` (None: the family's own fused tensors)
    fused: Mapping[str, FusedSpec] | None = _spec_field(_mapping(_section(FusedSpec)), None)

    def check(self, where: str, label: str) -> None:
        if "{layer}" not in self.layer_prefix:
            raise WiscaError(f"{where}: {label}: layer_prefix must contain {{layer}}")


@dataclass(frozen=True)
class LinearAttentionSpec(_Section):
    """Gated DeltaNet token mixers (Qwen3-Next, Qwen3.5) in place of attention on the layers
    whose ``layer_types`` entry is ``layer_type``: their tensors by role (``LINEAR_ROLES``, or
    a fused tensor of the family's ``fused``), the config keys of their sizes, the linears
    reading each norm there (the ``norm`` target: the input norm's readers are the input
    projections; ``lin_norm``, the gated RMSNorm's weight shared by every value head, is read
    by ``lin_out``'s columns of every head), and why the qk and vo targets do not hold there."""
    layer_type: str = _spec_field(_string)
    tensors: Mapping[str, str] = _spec_field(_mapping(_string))
    key_heads: str = _spec_field(_string)
    value_heads: str = _spec_field(_string)
    key_head_dim: str = _spec_field(_string)
    value_head_dim: str = _spec_field(_string)
    conv_kernel: str = _spec_field(_string)
    norm_readers: Mapping[str, tuple[str, ...]] = _spec_field(_mapping(_str_list()))
    why: str = _spec_field(_string)                      # the report's reason: no qk, no vo here
    norm_offset: float = _spec_field(_number, 0.0)       # lin_norm's stored w is the factor (offset + w)
    # gated_deltanet (Qwen3-Next, Qwen3.5, OLMo-hybrid) or mamba2 (Granite 4: the roles MAMBA_ROLES;
    # key_heads, value_heads, key_head_dim, value_head_dim are then its groups, heads, state size, head dim)
    kind: str = _spec_field(_choice(*MIXER_ROLES), "gated_deltanet")
    when: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)   # role -> config flag it needs
    # without a layer_types list (as transformers' config class fills it in): every n-th layer full
    # attention, n = the config key ``full_every_key`` (Qwen's full_attention_interval) or else
    # ``full_every``; ``last_full``: the last layer where no n-th falls (OLMo-hybrid under n layers)
    full_every: int | None = _spec_field(_positive_int_value, None)
    full_every_key: str | None = _spec_field(_string, None)
    last_full: bool = _spec_field(_boolean, False)
    # config key of the expansion factor: a value_head_dim of "auto" is expand x hidden / value_heads
    # (Granite 4's mamba_d_head, as transformers derives it)
    auto_head_dim: str | None = _spec_field(_string, None)
    norm_eps: float | None = _spec_field(_number, None)   # lin_norm's eps (None: the model's rms_norm_eps)
    # config flag: beta = 2 sigmoid(b) where set (OLMo-hybrid's linear_allow_neg_eigval)
    beta_doubled: str | None = _spec_field(_string, None)
    # the decoder layer's own tensors that differ on these layers: role -> name (OLMo-hybrid's
    # pre-norm linear-attention layers beside its post-norm attention ones), and the roles they lack
    layer_tensors: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    drop: tuple[str, ...] = _spec_field(_str_list(), ())
    # lin_conv as saved: its q, k and v channels in separate tensors (in that order), which
    # transformers concatenates on load (OLMo-hybrid's q_conv1d, k_conv1d, v_conv1d)
    conv_split: tuple[str, ...] = _spec_field(_str_list(), ())
    # targets that hold on these layers but not on the family's full-attention layers -> why not there
    full_attention_lacks: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)

    def check(self, where: str, label: str) -> None:
        roles = MIXER_ROLES[self.kind]   # a fused role (lin_*) is checked against the spec's fused
        for norm, readers in self.norm_readers.items():
            if norm not in ("attn_norm", "lin_norm"):
                raise WiscaError(f"{where}: {label}.norm_readers: {norm!r} is not attn_norm or lin_norm")
            bad = [r for r in readers if r not in roles]
            if bad:
                raise WiscaError(f"{where}: {label}.norm_readers.{norm}: {bad[0]!r} is not a linear-attention role")
        if self.conv_split and len(self.conv_split) != 3:
            raise WiscaError(f"{where}: {label}.conv_split: the conv's q, k and v parts, got {list(self.conv_split)}")
        bad = [t for t in self.full_attention_lacks if t not in SPEC_TARGETS]
        if bad:
            raise WiscaError(f"{where}: {label}.full_attention_lacks: {bad[0]!r} is not a target "
                             f"({', '.join(SPEC_TARGETS)})")


@dataclass(frozen=True)
class PerLayerInputSpec(_Section):
    """Per-layer input embeddings (Gemma 4's PLE), where the config key ``size`` is set: ``embed``
    [vocab, layers x size] (looked up by token, times sqrt(size)) and ``projection`` [layers x
    size, hidden] (of the scaled embeddings, times hidden ** -0.5, then RMSNorm ``norm`` [size])
    give each layer an input [size]: (projection + embedding) / sqrt(2). A layer adds
    ``ple_norm(ple_proj(act(ple_gate h) * input))`` to h after its MLP. No symmetry is declared
    on these tensors (a scale of one layer's input channel is shared by every layer's): copied."""
    size: str = _spec_field(_string)
    vocab: str = _spec_field(_string)
    embed: str = _spec_field(_string)
    projection: str = _spec_field(_string)
    norm: str = _spec_field(_string)


@dataclass(frozen=True)
class MultimodalSpec(_Section):
    """The family as released inside a multimodal checkpoint (``*ForConditionalGeneration``):
    config.json's ``model_type`` is one of ``model_types`` and the language model's config sits
    under ``text_config``; its tensors carry other name prefixes (``renames``: the text model's
    prefix -> the one there, e.g. ``model.`` -> ``model.language_model.``). Every other tensor
    (the vision and audio towers, the projector) is copied byte for byte and reported so."""
    model_types: tuple[str, ...] = _spec_field(_str_list(nonempty=True))
    renames: Mapping[str, str] = _spec_field(_mapping(_string))
    text_config: str = _spec_field(_string, "text_config")


@dataclass(frozen=True)
class ArchSpec(_Section):
    name: str = _spec_field(_string)
    model_types: tuple[str, ...] = _spec_field(_str_list(nonempty=True))
    embed: str = _spec_field(_string)
    final_norm: str = _spec_field(_string)
    lm_head: str = _spec_field(_string)
    layer_prefix: str = _spec_field(_string)                         # with {layer}
    norm: NormSpec = _spec_field(_section(NormSpec))
    layer_tensors: Mapping[str, str] = _spec_field(_mapping(_string))            # role -> name in a layer
    attention: AttentionSpec = _spec_field(_section(AttentionSpec))
    mlp: MlpSpec = _spec_field(_section(MlpSpec))
    targets: tuple[str, ...] = _spec_field(_str_list(SPEC_TARGETS))
    inexact_targets: tuple[str, ...] = _spec_field(_str_list(SPEC_TARGETS), ())  # round even with pow2 scales
    target_layers: Mapping[str, TargetLayers] = _spec_field(_mapping(_section(TargetLayers)), factory=_no_entries)
    optional_tensors: Mapping[str, OptionalTensor] = _spec_field(_mapping(_section(OptionalTensor)), factory=_no_entries)
    # norm role -> roles of the linears reading it (the norm target); MLP_ROLES are read on
    # every MLP of the layer (dense, each expert, the shared expert), then the others in order
    norm_readers: Mapping[str, tuple[str, ...]] = _spec_field(_mapping(_str_list()), factory=_no_entries)
    config_keys: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)  # canonical -> family key
    # config key -> the value transformers' config class gives it when config.json leaves it out
    config_defaults: Mapping[str, Any] = _spec_field(_mapping(_scalar), factory=_no_entries)
    # config key -> the other names config.json files give it (transformers' ``attribute_map``:
    # a Qwen3-MoE config of transformers 4 says num_experts, transformers 5 num_local_experts)
    config_aliases: Mapping[str, tuple[str, ...]] = _spec_field(_mapping(_str_list(nonempty=True)),
                                                                factory=_no_entries)
    linear: str = _spec_field(_choice("linear", "conv1d"), "linear")  # conv1d (GPT-2): W[in, out]
    fused: Mapping[str, FusedSpec] = _spec_field(_mapping(_section(FusedSpec)), factory=_no_entries)
    block: BlockSpec = _spec_field(_section(BlockSpec), factory=BlockSpec)
    moe: MoeSpec | None = _spec_field(_section(MoeSpec), None)       # None: dense
    embedding: EmbeddingSpec = _spec_field(_section(EmbeddingSpec), factory=EmbeddingSpec)
    final: FinalSpec = _spec_field(_section(FinalSpec), factory=FinalSpec)
    # saved name -> the name transformers 5 holds it under in memory (its conversion mapping's
    # WeightRenaming), which a state dict saved from the live model carries (DCP) and a live
    # transition looks up: a key with a leading "." renames that segment anywhere in a name,
    # any other key a name's start (GPT-NeoX: "embed_out." -> "lm_head.")
    memory_renames: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    # model_type -> why a checkpoint of it is refused (Llama 4's multimodal config beside its text model)
    refused_model_types: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    # config key: that many layers after num_hidden_layers that transformers does not load
    # (multi-token prediction); their tensors are copied unchanged
    extra_layers: str | None = _spec_field(_string, None)
    # config key -> why a checkpoint whose config sets it (not null, not false) is refused
    refuse_when: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    # config key -> why a checkpoint whose config.json lacks it is refused: a value transformers' config
    # class derives in a way the spec does not state (Gemma 4's layer_types, its rope per layer type)
    require_keys: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)
    # config key (``quantization_config``): where its quant_method is "fp8", linear weights with a
    # ``weight_scale_inv`` beside them are FP8 block-quantised (``fp8.py``), rescaled in that format
    fp8: str | None = _spec_field(_string, None)
    # hybrid families: a Gated DeltaNet token mixer on some layers (None: attention on every layer)
    linear_attention: LinearAttentionSpec | None = _spec_field(_section(LinearAttentionSpec), None)
    # the multimodal checkpoint the family is released in (its language model transformed)
    multimodal: MultimodalSpec | None = _spec_field(_section(MultimodalSpec), None)
    per_layer_input: PerLayerInputSpec | None = _spec_field(_section(PerLayerInputSpec), None)
    # a target the family lacks -> why (the report and the support matrix say so): Gemma 4's vo
    target_why: Mapping[str, str] = _spec_field(_mapping(_string), factory=_no_entries)

    def check(self, where: str, label: str) -> None:
        if "{layer}" not in self.layer_prefix:
            raise WiscaError(f"{where}: layer_prefix must contain {{layer}}, got {self.layer_prefix!r}")
        extra = [t for t in self.inexact_targets if t not in self.targets]
        if extra:
            raise WiscaError(f"{where}: inexact target {extra[0]!r} is not in targets ({', '.join(self.targets)})")
        extra = [t for t in self.target_layers if t not in self.targets]
        if extra:
            raise WiscaError(f"{where}: target_layers names {extra[0]!r}, which is not in targets "
                             f"({', '.join(self.targets)})")
        if self.attention.output_gate and self.attention.qk_norm != "head":
            raise WiscaError(f"{where}: attention.output_gate needs qk_norm \"head\" (the qk target then lives "
                             f"on the norm weights, not on q_proj's rows, which interleave the gate's)")
        if "conv" in self.targets and not self.linear_attention:
            raise WiscaError(f"{where}: the conv target needs linear_attention (a causal conv to pair with)")
        if self.linear_attention:
            fused_parts = {p for f in self.fused.values() for p in f.parts}
            roles = MIXER_ROLES[self.linear_attention.kind]
            bad = [r for r in self.linear_attention.tensors if r not in roles and r not in self.fused]
            if bad:
                raise WiscaError(f"{where}: linear_attention.tensors: {bad[0]!r} is not a "
                                 f"{self.linear_attention.kind} role ({', '.join(roles)}) or a fused one of fused")
            named = {r for r in self.linear_attention.tensors if r in roles} | fused_parts
            missing = [r for r in roles if r not in named]
            if missing:
                raise WiscaError(f"{where}: linear_attention.tensors lacks {', '.join(missing)} "
                                 f"(by name or as a part of a fused tensor)")
        if self.target_layers and not self.attention.rope_layers:
            raise WiscaError(f"{where}: target_layers needs attention.rope_layers (which layers are RoPE / NoPE)")
        if "norm" in self.targets and not self.norm_readers:
            raise WiscaError(f"{where}: the norm target needs norm_readers")
        fused_mlp = [f"{prefix}{role}" for prefix, tensors in
                     (("shared.", self.moe.shared_tensors if self.moe else {}), ("", self.moe.dense_tensors if self.moe else {}))
                     for role in tensors if role not in MLP_ROLES]
        missing = [f for f in fused_mlp if f not in self.fused]
        if missing:
            raise WiscaError(f"{where}: moe names the fused MLP tensor {missing[0]!r}, which fused does not describe")
        if self.block.shared_norm:
            if "mlp_norm" in self.layer_tensors or "mlp_norm" in self.norm_readers:
                raise WiscaError(f"{where}: block.shared_norm: the MLP reads attn_norm, so there is no mlp_norm "
                                 f"(in layer_tensors or norm_readers)")
            if "attn_norm" not in self.layer_tensors:
                raise WiscaError(f"{where}: block.shared_norm needs an attn_norm in layer_tensors")

    def adapted(self, name: str, a: "NameAdapter") -> "ArchSpec":
        """This family under framework ``name``'s names (``framework.FamilyNames``; its
        ``moe``: the router and the 3-D expert tensors under their names there)."""
        attention = self.attention if a.rotary is None else replace(self.attention, rotary=a.rotary)
        moe_names = getattr(a, "moe", None)
        if moe_names is not None and self.moe is not None:
            self = replace(self, moe=replace(self.moe, router=moe_names.router, fused_router=None,
                                             fused_experts=moe_names.fused_experts,
                                             expert_tensors=MappingProxyType({})))
        fused = self.fused if a.fused is None else MappingProxyType(dict(a.fused))
        return replace(self, name=f"{self.name}+{name}", embed=a.embed, final_norm=a.final_norm,
                       lm_head=a.lm_head, layer_prefix=a.layer_prefix, attention=attention,
                       layer_tensors=MappingProxyType(dict(a.layer_tensors)), fused=fused)

    def inside_multimodal(self) -> "ArchSpec":
        """This family's names inside its multimodal checkpoint (``multimodal.renames``)."""
        def renamed(name: str) -> str:
            for prefix, there in self.multimodal.renames.items():
                if name.startswith(prefix):
                    return there + name[len(prefix):]
            return name

        ple = self.per_layer_input
        if ple is not None:
            ple = replace(ple, embed=renamed(ple.embed), projection=renamed(ple.projection), norm=renamed(ple.norm))
        return replace(self, embed=renamed(self.embed), final_norm=renamed(self.final_norm),
                       lm_head=renamed(self.lm_head), layer_prefix=renamed(self.layer_prefix), per_layer_input=ple)

    def language_model_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of the language model's tensors (inside a multimodal checkpoint: renamed)."""
        ple = self.per_layer_input
        names = (self.embed, self.final_norm, self.lm_head, self.layer_prefix.split("{layer}")[0],
                 *((ple.embed, ple.projection, ple.norm) if ple else ()))
        return tuple(sorted(set(names)))

    def memory_name(self, name: str) -> str:
        """A saved tensor name as transformers 5 names it in memory (``memory_renames``)."""
        for saved, mem in self.memory_renames.items():
            if saved.startswith("."):
                name = name.replace(saved, mem)
            elif name.startswith(saved):
                name = mem + name[len(saved):]
        return name

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer) + suffix

    def norm_readers_at(self, linear: bool) -> Mapping[str, tuple[str, ...]]:
        """norm role -> its readers on an attention layer, or (``linear``) on a linear-attention
        one: there the input norm feeds the Gated DeltaNet's projections and ``lin_norm`` its
        output projection."""
        if not linear:
            return self.norm_readers
        return {**self.norm_readers, **self.linear_attention.norm_readers}

    def norm_reader_roles(self, norm: str, mlp_prefixes: list[str], linear: bool = False) -> list[str]:
        """The roles reading a norm: MLP roles on every MLP (``experts.3.gate``), then the rest."""
        readers = self.norm_readers_at(linear).get(norm, ())
        return ([p + r for p in mlp_prefixes for r in readers if r in MLP_ROLES]
                + [r for r in readers if r not in MLP_ROLES])


def _mlp_role(role: str, spec: "ArchSpec") -> bool:
    """Whether a layer role belongs to the MLP sub-block (its norm, dense or MoE MLP)."""
    base = role.split(".", 1)[0] if role.startswith(("experts.", "shared.")) else role
    return role.startswith(("experts.", "shared.", "mlp_norm", "post_mlp_norm", "router")) or role == "shared_gate" or \
        base.removesuffix("_bias") in MLP_ROLES or role in spec.fused and \
        all(p.removeprefix("shared.") in MLP_ROLES for p in spec.fused[role].parts)


# -- loading ---------------------------------------------------------------------------------
def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, deeply: objects merged key by key, lists and scalars
    replaced, a null removing the key (the field's default, or no such role)."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def parse_spec(data: dict, where: str = "spec") -> ArchSpec:
    """A complete spec (no ``extends``) as an ``ArchSpec``; nulls are dropped first."""
    return _build(ArchSpec, merge({}, data), where, "", partial=False)


def _resolved(name: str, raw: dict[str, tuple[str, dict]], stack: tuple[str, ...] = ()) -> dict:
    where, data = raw[name]
    parent = data.get("extends")
    if parent is None:
        return merge({}, {k: v for k, v in data.items() if k != "extends"})
    if not isinstance(parent, str) or parent not in raw:
        raise WiscaError(f"{where}: extends {json.dumps(parent)} names no spec (known: {', '.join(sorted(raw))})")
    if parent in stack or parent == name:
        raise WiscaError(f"{where}: extends {parent!r} makes a cycle ({' -> '.join((*stack, name, parent))})")
    base = {k: v for k, v in _resolved(parent, raw, (*stack, name)).items() if k not in (*NOT_INHERITED, *OWN_ONLY)}
    return merge(base, {k: v for k, v in data.items() if k != "extends"})


def load_specs(files: Mapping[str, Any]) -> dict[str, ArchSpec]:
    """Spec name -> ``ArchSpec`` for spec files (file name -> parsed JSON), each checked on
    its own (unknown keys, value types: the error names the file that has them), then
    resolved through ``extends`` and checked complete."""
    raw: dict[str, tuple[str, dict]] = {}
    for where, data in files.items():
        if not isinstance(data, dict):
            raise _bad(where, "the spec", "an object", data)
        _build(ArchSpec, data, where, "", partial=True, also=("extends",))
        for key in NOT_INHERITED:
            if key not in data:
                raise WiscaError(f"{where}: missing key {key!r} in the spec (not inherited through extends)")
        stem = where.rsplit("/", 1)[-1].removesuffix(".json")
        if data["name"] != stem and where.endswith(".json"):
            raise WiscaError(f"{where}: name {data['name']!r} differs from the file name")
        if data["name"] in raw:
            raise WiscaError(f"{where}: spec {data['name']!r} is also in {raw[data['name']][0]}")
        raw[data["name"]] = (where, data)
    def depth(name: str) -> int:      # parents first: an error is named where it starts
        seen = [name]
        while isinstance(raw[seen[-1]][1].get("extends"), str) and raw[seen[-1]][1]["extends"] in raw:
            if raw[seen[-1]][1]["extends"] in seen:
                break
            seen.append(raw[seen[-1]][1]["extends"])
        return len(seen)

    specs, owner = {}, {}
    for name in sorted(raw, key=lambda n: (depth(n), n)):
        where = raw[name][0]
        spec = _build(ArchSpec, _resolved(name, raw), where, "", partial=False)
        for model_type in spec.model_types + (spec.multimodal.model_types if spec.multimodal else ()):
            if model_type in owner:
                raise WiscaError(f"{where}: model_type {model_type!r} is also served by {raw[owner[model_type]][0]}")
            owner[model_type] = name
        specs[name] = spec
    for name, s in specs.items():   # a model_type is served or refused, not both
        for model_type in s.refused_model_types:
            if model_type in owner:
                raise WiscaError(f"{raw[name][0]}: refused_model_types names {model_type!r}, which is served by "
                                 f"{raw[owner[model_type]][0]}")
    return specs


def package_json(folder: str) -> dict[str, Any]:
    """``folder/name.json`` -> parsed JSON, for every JSON file of a folder of the package."""
    files = {}
    for entry in sorted(resources.files(__package__).joinpath(folder).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            where = f"{folder}/{entry.name}"
            try:
                files[where] = json.loads(entry.read_text())
            except ValueError as e:
                raise WiscaError(f"{where}: not valid JSON ({e})") from None
    return files


@lru_cache(maxsize=None)
def shipped_specs() -> dict[str, ArchSpec]:
    """Spec name -> spec, for every file in ``architectures/`` (all checked on first use)."""
    return load_specs(package_json("architectures"))


@lru_cache(maxsize=None)
def all_specs() -> dict[str, ArchSpec]:
    """model_type -> spec, for every family shipped."""
    return {model_type: spec for spec in shipped_specs().values()
            for model_type in spec.model_types + (spec.multimodal.model_types if spec.multimodal else ())}


def supported_model_types() -> list[str]:
    return sorted(all_specs())


def spec_for(model_type: str | None, where: str = "config.json") -> ArchSpec:
    specs = all_specs()
    if model_type not in specs:
        for s in shipped_specs().values():
            if model_type in s.refused_model_types:
                why = s.refused_model_types[model_type]
                raise WiscaError(f"{where}: model_type {model_type!r} is not supported: {why}")
        raise WiscaError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(supported_model_types())})"
        )
    return specs[model_type]


@dataclass(frozen=True)
class Layout:
    """The shape facts of one checkpoint: spec + config.json."""

    spec: ArchSpec
    config: dict = field(repr=False)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    act: str
    tie_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None
    rotary_dims: int
    sliding_window: int | None
    experts: int = 0                 # routed experts per MoE layer (0: dense)
    expert_intermediate: int = 0
    shared_intermediate: int = 0     # shared expert (0: none)
    mla: MlaDims | None = None       # multi-head latent attention's sizes (None: q, k, v heads)
    fused_experts: bool = False      # the experts stored in 3-D tensors (moe.fused_experts)
    mxfp4_experts: bool = False      # ... as MXFP4 blocks and scales (moe.mxfp4), copied unchanged
    fp8_block: tuple[int, int] | None = None   # FP8 block-quantised weights: weight_block_size (spec.fp8)
    fp8_weights: frozenset = frozenset()       # ... the names of the weights stored so (a weight_scale_inv beside)
    linear: LinearDims | None = None           # Gated DeltaNet layers' sizes (spec.linear_attention)
    conv_split: bool = False                   # ... their conv saved in parts (linear_attention.conv_split)
    conv_split_sizes: tuple[int, ...] = ()     # ... the parts' channels, the same on every layer (else ())

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def config_flag(self, when: Any) -> bool:
        if isinstance(when, bool):
            return when
        if isinstance(when, tuple):
            return all(self.config_flag(w) for w in when)
        return bool(self.config.get(when, False))

    @property
    def rotary_style(self) -> str | None:
        """``half``, ``interleaved`` or None: the spec's, or interleaved where its config flag is set."""
        att = self.spec.attention
        return "interleaved" if att.rotary and att.rotary_interleave and self.config_flag(att.rotary_interleave) \
            else att.rotary

    def value(self, key: Any, default: Any = None) -> Any:
        """A config value named by a spec field (a literal number or bool passes through)."""
        if key is None:
            return default
        if isinstance(key, (bool, int, float)):
            return key
        got = self.config.get(key)
        if got is None and "." in key:            # a dotted path into a dict (rope_parameters.x)
            got = self.config
            for part in key.split("."):
                got = got.get(part) if isinstance(got, dict) else None
        return default if got is None else got

    # -- per layer ---------------------------------------------------------------------------
    def at(self, layer: int) -> "Layout":
        """This layout with one layer's own sizes where layers differ in them (Gemma 4: head dim and
        kv heads per layer type, the rotary dims that follow, a double-wide MLP); else itself."""
        dims, wide = self.spec.attention.layer_dims, self.spec.mlp.double_wide
        if dims is None and not wide:
            return self
        head_dim, kv_heads, rotary = self.head_dim, self.kv_heads, self.rotary_dims
        if dims is not None:
            listed = self.config.get(dims.key)
            if isinstance(listed, dict):   # config.json: {"3": {"head_dim": 512, ...}}
                over = listed.get(str(layer)) or listed.get(layer) or {}
                head_dim = over.get("head_dim") or head_dim
                kv_heads = over.get("num_key_value_heads") or kv_heads
            elif self.layer_type(layer) == dims.layer_type:   # as transformers' config class fills it in
                head_dim = self.config.get(dims.head_dim) or dims.head_dim_default
                if self.config_flag(dims.kv_heads_when) and self.config.get(dims.kv_heads):
                    kv_heads = self.config[dims.kv_heads]
            theta, scaling = self.rope_at(layer)
            kind = (scaling or {}).get("rope_type", "default")
            # proportional RoPE turns the whole head (zero frequency past the rotated share)
            partial = 1.0 if kind == "proportional" else float((scaling or {}).get("partial_rotary_factor", 1.0))
            rotary = int(head_dim * partial) if self.spec.attention.rotary else 0
            rotary -= rotary % 2
        inter = self.intermediate * (2 if wide and self.config_flag(wide) and self.kv_mode(layer) == "reuse" else 1)
        if (head_dim, kv_heads, rotary, inter) == (self.head_dim, self.kv_heads, self.rotary_dims, self.intermediate):
            return self
        return replace(self, head_dim=head_dim, kv_heads=kv_heads, rotary_dims=rotary, intermediate=inter)

    def kv_mode(self, layer: int) -> str | None:
        """``reuse``: the layer takes the keys and values of an earlier one (the spec's
        ``kv_shared``: the last n layers); ``store``: the last layer of its type before those,
        whose keys and values they reuse; else None (transformers' ``kv_sharing_modes``)."""
        key = self.spec.attention.kv_shared
        n = int(self.config.get(key) or 0) if key else 0
        if not n:
            return None
        first = self.layers - n
        if layer >= first:
            return "reuse"
        kind = self.layer_type(layer)
        later = [self.layer_type(i) for i in range(layer + 1, first)]
        return "store" if kind not in later else None

    def kv_source(self, layer: int) -> int | None:
        """The layer whose keys and values a ``reuse`` layer takes."""
        if self.kv_mode(layer) != "reuse":
            return None
        kind = self.layer_type(layer)
        return next(i for i in range(self.layers - 1, -1, -1) if self.kv_mode(i) == "store" and self.layer_type(i) == kind)

    def v_from_k(self, layer: int) -> bool:
        """No v_proj on this layer: the values are k_proj's output (Gemma 4's attention_k_eq_v)."""
        att = self.spec.attention
        return bool(att.k_eq_v) and self.config_flag(att.k_eq_v) and self.layer_type(layer) == att.k_eq_v_layer_type

    @property
    def ple_size(self) -> int:
        """Per-layer input embeddings' size per layer (0: none)."""
        ple = self.spec.per_layer_input
        return int(self.config.get(ple.size) or 0) if ple else 0

    def layer_type(self, layer: int) -> str | None:
        types = self.config.get("layer_types")
        return types[layer] if isinstance(types, list) and layer < len(types) else None

    def rope_at(self, layer: int) -> tuple[float, dict | None]:
        """(theta, scaling) of one layer: Gemma3 keeps rope parameters per layer type."""
        rope = self.config.get("rope_parameters") or {}
        kind = self.layer_type(layer)
        att = self.spec.attention
        if att.rope_keys or att.rope_key_default:   # DeepSeek-V4: "main" / "compress" by layer type
            kind = att.rope_keys.get(kind, att.rope_key_default)
        if kind and isinstance(rope.get(kind), dict):
            rope = rope[kind]
            scaling = rope if rope.get("rope_type", "default") != "default" else None
            return float(rope.get("rope_theta", self.rope_theta)), scaling
        return self.rope_theta, self.rope_scaling

    def rotary_dims_at(self, layer: int) -> int:
        """Rotary dims of one layer: 0 on SmolLM3's NoPE layers; Gemma 4's per layer type."""
        key = self.spec.attention.rope_layers
        flags = self.config.get(key) if key else None
        if isinstance(flags, list) and layer < len(flags) and not flags[layer]:
            return 0
        return self.at(layer).rotary_dims

    def window_at(self, layer: int) -> int | None:
        kind = self.layer_type(layer)
        if self.spec.attention.compressed:   # DeepSeek-V4: every layer's own keys in a sliding window
            return self.sliding_window
        if kind is not None and kind != "sliding_attention":
            return None
        return self.sliding_window

    def chunk_at(self, layer: int) -> int | None:
        """The chunk size of chunked attention on one layer (Llama 4), or None: the layers
        whose ``layer_types`` entry is ``chunked_attention``, without layer_types the RoPE layers."""
        key = self.spec.attention.chunk_size
        size = self.config.get(key) if key else None
        if not size:
            return None
        kind = self.layer_type(layer)
        chunked = kind == "chunked_attention" if kind is not None else self.rotary_dims_at(layer) > 0
        return int(size) if chunked else None

    def is_linear_layer(self, layer: int) -> bool:
        """A layer whose token mixer is a linear attention (``spec.linear_attention``)."""
        la = self.spec.linear_attention
        return la is not None and self.layer_type(layer) == la.layer_type

    def not_applicable_why(self, target: str, layer: int) -> str | None:
        """Why a target the family has does not hold on this layer, or None where it does."""
        if target in ("qk", "vo") and self.is_linear_layer(layer):
            return self.spec.linear_attention.why
        if target == "qk" and self.kv_mode(layer) is not None:
            return KV_SHARED_WHY
        if target == "conv" and not self.is_linear_layer(layer):
            return "no causal conv on this layer (attention or an MLP block)"
        if target == "conv" and self.conv_split and not self.conv_split_sizes:
            return ("the conv is saved as three tensors whose sizes differ between layers; it is left as saved")
        la = self.spec.linear_attention
        if la is not None and target in la.full_attention_lacks and not self.is_linear_layer(layer):
            return la.full_attention_lacks[target]
        return None if self.target_applies(target, layer) else self.spec.target_layers[target].why

    def target_applies(self, target: str, layer: int) -> bool:
        """Whether a target the family has holds on this layer (``target_layers``; no qk or
        vo on a linear-attention layer)."""
        if target in ("qk", "vo") and self.is_linear_layer(layer):
            return False
        if target == "qk" and self.kv_mode(layer) is not None:
            return False
        if target == "conv":
            return self.is_linear_layer(layer) and (not self.conv_split or bool(self.conv_split_sizes))
        la = self.spec.linear_attention
        if la is not None and target in la.full_attention_lacks and not self.is_linear_layer(layer):
            return False
        rule = self.spec.target_layers.get(target)
        if rule is None or not self.config_flag(rule.when):
            return True
        return (self.rotary_dims_at(layer) > 0) == (rule.only == "rope")

    def is_hash_layer(self, layer: int) -> bool:
        """An MoE layer routed by a token -> experts table (``moe.hash_layers``)."""
        hashed = self.spec.moe.hash_layers if self.spec.moe else None
        kinds = self.config.get(hashed.key) if hashed else None
        return isinstance(kinds, list) and layer < len(kinds) and kinds[layer] == hashed.kind

    @property
    def streams(self) -> int:
        """Residual streams (hyper-connections: DeepSeek-V4's hc_mult), 1 without."""
        hyper = self.spec.block.hyper
        return int(self.value(hyper.mult, 1)) if hyper else 1

    def is_moe_layer(self, layer: int) -> bool:
        moe = self.spec.moe
        if not moe or not self.experts or moe.when and not self.config_flag(moe.when):
            return False
        if moe.layer_kind:
            return self.layer_type(layer) == moe.layer_kind
        listed = self.config.get(moe.moe_layers) if moe.moe_layers else None
        if isinstance(listed, list):
            return layer in listed
        if moe.dense_layers and layer in (self.config.get(moe.dense_layers) or []):
            return False
        if layer < int(self.value(moe.first_dense, 0) or 0):
            return False
        step = self.value(moe.sparse_step, 1) or 1
        return (layer + 1) % step == 0

    def layer_roles(self, layer: int) -> dict[str, str]:
        """role -> full tensor name for one decoder layer (required and enabled optional)."""
        spec = self.spec
        roles = {role: spec.layer_name(layer, name) for role, name in spec.layer_tensors.items()}
        for role, opt in spec.optional_tensors.items():
            if self.config_flag(opt.when) and not (opt.unless and self.config_flag(opt.unless)):
                roles[role] = spec.layer_name(layer, opt.name)
        if self.is_linear_layer(layer):   # its token mixer: a Gated DeltaNet, not attention
            la = spec.linear_attention
            roles = {role: name for role, name in roles.items() if role not in ATTENTION_ROLES + la.drop}
            roles.update({role: spec.layer_name(layer, name) for role, name in {**la.tensors, **la.layer_tensors}.items()
                          if role not in la.when or self.config_flag(la.when[role])})
            if self.conv_split:   # saved as its q, k and v channels
                del roles["lin_conv"]
                roles.update({role: spec.layer_name(layer, name) for role, name in zip(CONV_PARTS, la.conv_split)})
        comp = spec.attention.compressed
        if comp is not None and self.layer_type(layer) in (comp.sparse_type, comp.heavy_type):
            roles.update({role: spec.layer_name(layer, name) for role, name in comp.compressor.items()})
            if self.layer_type(layer) == comp.sparse_type:   # the indexer picks the compressed entries
                roles.update({role: spec.layer_name(layer, name) for role, name in comp.indexer.items()})
        moe = spec.moe
        if moe:
            if self.is_moe_layer(layer):
                roles.update({role: spec.layer_name(layer, name) for role, name in moe.layer_tensors.items()})
                router = moe.fused_router if self.fused_experts and moe.fused_router else moe.router
                roles["router"] = spec.layer_name(layer, router)
                if moe.router_bias:
                    roles["router_bias"] = spec.layer_name(layer, moe.router_bias)
                if self.is_hash_layer(layer):   # experts by token: the table, no correction bias
                    roles["router_table"] = spec.layer_name(layer, moe.hash_layers.table)
                elif moe.correction:
                    roles["router_correction"] = spec.layer_name(layer, moe.correction)
                if self.fused_experts:
                    for fused, info in moe.fused_experts.items():
                        for suffix in (tuple("_" + p for p in mxfp4.PARTS) if self.mxfp4_experts else ("",)):
                            roles[f"experts.{fused}{suffix}"] = spec.layer_name(layer, info.name + suffix)
                        if info.bias:
                            roles[f"experts.{fused}_bias"] = spec.layer_name(layer, info.bias)
                else:
                    for e in range(self.experts):
                        for role, name in moe.expert_tensors.items():
                            roles[f"experts.{e}.{role}"] = spec.layer_name(layer, name.format(expert=e))
                if self.shared_intermediate:
                    for role, name in moe.shared_tensors.items():
                        roles[f"shared.{role}"] = spec.layer_name(layer, name)
                    if moe.shared_gate:
                        roles["shared_gate"] = spec.layer_name(layer, moe.shared_gate)
            else:
                roles.update({role: spec.layer_name(layer, name)
                              for role, name in moe.dense_tensors.items()})
        if self.kv_mode(layer) == "reuse":   # keys and values of an earlier layer: no k, v of its own
            roles = {role: name for role, name in roles.items() if role not in KV_ROLES}
        elif self.v_from_k(layer):           # the values are k_proj's output
            roles = {role: name for role, name in roles.items() if role not in ("v", "v_bias")}
        if spec.block.kinds:   # one sub-block: the MLP's roles or the token mixer's
            mlp_side = self.layer_type(layer) in spec.block.mlp_kinds
            roles = {role: name for role, name in roles.items() if _mlp_role(role, spec) == mlp_side}
        if self.fp8_weights:   # FP8 weights: their block scales (a fold's powers of two per block)
            roles.update({role + fp8.SCALE_SUFFIX: fp8_scale_name(name)
                          for role, name in list(roles.items()) if name in self.fp8_weights})
        return roles

    def is_fp8(self, role: str, name: str) -> bool:
        """An FP8 block-quantised weight (its role is a linear's, its codes float8_e4m3fn)."""
        return name in self.fp8_weights and not role.endswith(fp8.SCALE_SUFFIX)

    def fused_parts(self, fused_role: str) -> dict[str, torch.Tensor]:
        """part -> positions (along the output axis) of that part inside a fused tensor.

        ``concat``: parts one after the other (Phi-3 qkv_proj, gate_up_proj, GPT-2 c_attn);
        ``heads``: per head [q d | k d | v d] (GPT-NeoX query_key_value);
        ``kv_groups``: per kv head [its R query heads | k | v] (Megatron's linear_qkv)."""
        info = self.spec.fused[fused_role]
        sizes = [self.part_size(p) for p in info.parts]
        if info.layout == "key_groups":   # per key head, each part's share of it in turn
            groups = self.linear.key_heads
            share = [n // groups for n in sizes]
            base = torch.arange(groups)[:, None] * sum(share)
            out, start = {}, 0
            for p, n in zip(info.parts, share):
                out[p] = (base + start + torch.arange(n)[None, :]).reshape(-1)
                start += n
            return out
        if info.layout == "kv_groups":
            d, r = self.head_dim, self.heads // self.kv_heads
            group = torch.arange(self.kv_heads)[:, None] * ((r + 2) * d)
            return {"q": (group + torch.arange(r * d)[None, :]).reshape(-1),
                    "k": (group + r * d + torch.arange(d)[None, :]).reshape(-1),
                    "v": (group + (r + 1) * d + torch.arange(d)[None, :]).reshape(-1)}
        if info.layout == "heads":
            d, n = self.head_dim, len(sizes)
            heads = torch.arange(self.heads)[:, None] * (n * d)
            return {p: (heads + i * d + torch.arange(d)[None, :]).reshape(-1) for i, p in enumerate(info.parts)}
        out, start = {}, 0
        for p, size in zip(info.parts, sizes):
            out[p] = torch.arange(start, start + size)
            start += size
        return out

    def expert_parts(self, fused: str) -> dict[str, slice]:
        """part -> its positions (a slice) along the out axis of a fused 3-D expert tensor."""
        info = self.spec.moe.fused_experts[fused]
        n = len(info.parts)
        if info.layout == "interleaved":
            return {p: slice(i, None, n) for i, p in enumerate(info.parts)}
        size = self.hidden if info.parts == ("down",) else self.expert_intermediate
        return {p: slice(i * size, (i + 1) * size) for i, p in enumerate(info.parts)}

    def fused_expert_shape(self, fused: str, bias: bool = False) -> tuple[int, ...]:
        """Shape of a fused 3-D expert tensor as stored (``bias``: of its ``[E, out]`` bias)."""
        info = self.spec.moe.fused_experts[fused]
        out, inner = (self.hidden, self.expert_intermediate) if info.parts == ("down",) else \
            (self.expert_intermediate * len(info.parts), self.hidden)
        sizes = {"experts": self.experts, "out": out, "in": inner}
        return (self.experts, out) if bias else tuple(sizes[d] for d in info.dims)

    def is_mxfp4(self, role: str) -> bool:
        """An MXFP4 blocks or scales tensor of the experts (uint8, copied unchanged)."""
        return self.mxfp4_experts and role.startswith("experts.") and role.endswith(("_blocks", "_scales"))

    def fused_expert_of(self, part: str) -> str | None:
        """The fused 3-D expert tensor holding an expert role (``up`` -> ``gate_up``), or None."""
        if self.fused_experts:
            for fused, info in self.spec.moe.fused_experts.items():
                if part in info.parts:
                    return fused
        return None

    def part_size(self, role: str) -> int:
        if role.startswith(("lin_", "shared.")):
            return logical_shapes(self, 0)[role][0]
        q = self.heads * self.head_dim * (2 if self.spec.attention.output_gate else 1)
        return {"q": q, "k": self.kv_heads * self.head_dim,
                "v": self.kv_heads * self.head_dim, "gate": self.intermediate, "up": self.intermediate}[role]

    def fused_of(self, role: str) -> str | None:
        """The fused tensor holding a logical role (``q`` -> ``qkv``), or None."""
        for fused, info in self.spec.fused.items():
            if role in info.parts:
                return fused
        return None


@dataclass(frozen=True)
class LinearDims:
    """A Gated DeltaNet layer's sizes: key heads (q and k), value heads (each key head serves
    value_heads / key_heads of them), their dims, and the causal conv's kernel."""
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int


def _linear_dims(config: dict, la: "LinearAttentionSpec", where: str) -> LinearDims:
    if la.auto_head_dim and config.get(la.value_head_dim) == "auto":
        expand = config.get(la.auto_head_dim, 2)
        config = {**config, la.value_head_dim: int(expand * _positive_int(config, "hidden_size", where))
                  // _positive_int(config, la.value_heads, where)}
    dims = LinearDims(*(_positive_int(config, key, where) for key in (
        la.key_heads, la.value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel)))
    if dims.value_heads % dims.key_heads:
        raise WiscaError(f"{where}: {la.value_heads}={dims.value_heads} is not a multiple of "
                         f"{la.key_heads}={dims.key_heads}")
    return dims


@dataclass(frozen=True)
class MlaDims:
    """Multi-head latent attention: q LoRA rank (0: a plain ``q``), kv LoRA rank, and per
    head the no-rope and rope dims of q and k and the dims of v."""
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v: int


def _mla_dims(config: dict, mla: MlaSpec, heads: int, kv_heads: int, where: str) -> MlaDims:
    if kv_heads != heads:   # kv_b_proj makes keys and values for every query head
        raise WiscaError(f"{where}: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
                         f"for multi-head latent attention")
    q_lora = config.get(mla.q_lora_rank)
    if q_lora is not None:
        q_lora = _positive_int(config, mla.q_lora_rank, where)
    dims = MlaDims(q_lora or 0, *(_positive_int(config, k, where) for k in
                                  (mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim)))
    if dims.rope % 2:
        raise WiscaError(f"{where}: {mla.qk_rope_head_dim} must be even, got {dims.rope}")
    return dims


def _need(config: dict, key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise WiscaError(f"{where}: missing required field {key!r}")
    return config[key]


def _positive_int(config: dict, key: str, where: str) -> int:
    value = _need(config, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise WiscaError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def layout_from_config(config: dict, where: str = "config.json", tensor_names=None,
                       spec: "ArchSpec | None" = None) -> Layout:
    """The layout of a checkpoint from its config.json. ``tensor_names``: the checkpoint's
    tensor names, which decide how the experts are stored where the spec knows both ways
    (one tensor per expert, or fused 3-D tensors); without them, per expert where the spec
    names such tensors. ``spec``: the family under a framework's names (``ArchSpec.adapted``)
    instead of the one ``model_type`` names."""
    if not isinstance(config, dict):
        raise WiscaError(f"{where}: expected a JSON object")
    spec = spec if spec is not None else spec_for(config.get("model_type"), where)
    mm = spec.multimodal
    if mm is not None and config.get("model_type") in mm.model_types:   # the language model inside
        text = config.get(mm.text_config)
        if not isinstance(text, dict):
            raise WiscaError(f"{where}: a {config.get('model_type')} checkpoint needs its language model's "
                             f"config under {mm.text_config!r}")
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        config = {**text, **({} if tied is None else {"tie_word_embeddings": tied})}
        spec = spec.inside_multimodal()
    mxfp4_key = spec.moe.mxfp4 if spec.moe else None
    quant = config.get(mxfp4_key) if mxfp4_key else None
    is_mxfp4 = isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"
    fp8_quant = config.get(spec.fp8) if spec.fp8 else None
    is_fp8 = isinstance(fp8_quant, dict) and fp8_quant.get("quant_method") == "fp8"
    for key, why in spec.refuse_when.items():
        if config.get(key) not in (None, False) and not (is_mxfp4 and key == mxfp4_key) \
                and not (is_fp8 and key == spec.fp8):
            raise WiscaError(f"{where}: {key}={json.dumps(config[key])} is not supported for {spec.name}: {why}")
    for key, why in spec.require_keys.items():
        if config.get(key) is None:
            raise WiscaError(f"{where}: {key} is missing, which {spec.name} needs stated: {why}")
    fp8_block = _fp8_block(fp8_quant, spec.fp8, where) if is_fp8 else None
    config = {**spec.config_defaults, **config}   # what transformers' config class fills in
    for key, aliases in spec.config_aliases.items():
        if key not in config:
            found = next((a for a in aliases if a in config), None)
            if found is not None:
                config = {**config, key: config[found]}
    # a family's own key names (GPT-2's n_embd, ...) under the canonical ones
    config = {**config, **{canon: config[key] for canon, key in spec.config_keys.items()
                           if config.get(key) is not None}}
    if config.get("intermediate_size") is None and spec.mlp.intermediate_default:
        config["intermediate_size"] = spec.mlp.intermediate_default * config.get("hidden_size", 0)
    for key in ("layer_types", spec.block.kinds):   # legacy names, as every transformers config renames them
        if key and isinstance(config.get(key), list):
            config = {**config, key: [LEGACY_LAYER_TYPES.get(t, t) for t in config[key]]}
    hidden = _positive_int(config, "hidden_size", where)
    heads = _positive_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise WiscaError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    mla = _mla_dims(config, spec.attention.mla, heads, kv_heads, where) if spec.attention.mla else None
    head_dim = (config.get("head_dim") if spec.attention.head_dim_key else None) or hidden // heads
    if mla:   # as transformers sets it: the rotary part of a head
        head_dim = mla.rope
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise WiscaError(f"{where}: head_dim must be a positive even integer, got {head_dim!r}")

    rope = config.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):   # per layer type (Gemma3)
        rope = rope.get("full_attention") or next(iter(rope.values()))
    scaling = config.get("rope_scaling") or None
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope and rope.get("rope_type", "default") != "default":
        scaling = rope
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary_dims = int(head_dim * partial) if spec.attention.rotary else 0
    if spec.attention.rope_when_key and config.get(spec.attention.rope_when_key) != "rope":   # NoPE
        rotary_dims = 0
    rotary_dims -= rotary_dims % 2
    if mla and spec.attention.rotary:   # the rope part is rotated whole (Mistral 4 states it as a partial factor
        rotary_dims = mla.rope          # of the whole q/k head, which transformers' head_dim is there)

    window = None
    window_key = spec.attention.sliding_window
    if window_key:
        enabled_key = spec.attention.sliding_window_enabled
        if enabled_key is None or config.get(enabled_key, False):
            window = config.get(window_key)

    moe, experts, expert_inter, shared_inter, fused, quantized = spec.moe, 0, 0, 0, False, False
    if moe and moe.when and not config.get(moe.when):   # experts switched off (Gemma 4's enable_moe_block)
        moe = None
    if moe:
        fused = bool(moe.fused_experts) and (not moe.expert_tensors or tensor_names is not None and any(
            name.endswith("." + info.name) for name in tensor_names for info in moe.fused_experts.values()))
        # an MXFP4 config with the experts as blocks (a dequantised save keeps the bf16 names)
        quantized = is_mxfp4 and bool(moe.fused_experts) and (tensor_names is None or any(
            name.endswith(f".{info.name}_blocks") for name in tensor_names for info in moe.fused_experts.values()))
        fused = fused or quantized
        experts = 0 if moe.zero_is_dense and config.get(moe.num_experts) == 0 else \
            _positive_int(config, moe.num_experts, where)
        expert_inter = _positive_int(config, moe.intermediate, where) if moe.intermediate else \
            _positive_int(config, "intermediate_size", where)
        if quantized and (hidden % mxfp4.BLOCK or expert_inter % mxfp4.BLOCK):
            raise WiscaError(f"{where}: MXFP4 experts need hidden_size and the expert intermediate size "
                             f"to be multiples of {mxfp4.BLOCK}, got {hidden} and {expert_inter}")
        if moe.shared_intermediate:
            shared_inter = int(config.get(moe.shared_intermediate) or 0)
        if moe.shared_count:
            shared_inter = expert_inter * int(config.get(moe.shared_count) or 0)

    if spec.block.pattern and config.get(spec.block.kinds) is None and isinstance(config.get(spec.block.pattern), str):
        letters, pattern = spec.block.pattern_letters, config[spec.block.pattern]
        bad = sorted(set(pattern) - set(letters))
        if bad:
            raise WiscaError(f"{where}: {spec.block.pattern}={pattern!r} has {bad[0]!r}, not one of "
                             f"{', '.join(repr(k) for k in letters)}")
        config = {**config, spec.block.kinds: [letters[c] for c in pattern]}
    if spec.block.kinds:   # one sub-block per layer: its kind is its layer type
        kinds = config.get(spec.block.kinds)
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise WiscaError(f"{where}: {spec.block.kinds} must list each layer's block kind for {spec.name}")
        config = {**config, "layer_types": kinds, "num_hidden_layers": len(kinds)}   # transformers: the list decides
    layers = _positive_int(config, "num_hidden_layers", where)
    linear = _linear_dims(config, spec.linear_attention, where) if spec.linear_attention else None
    # the conv saved in parts: a checkpoint's names say so (a model in memory holds it whole)
    split = spec.linear_attention.conv_split if spec.linear_attention else ()
    conv_split = bool(split) and tensor_names is not None and any(n.endswith("." + split[0]) for n in tensor_names)
    split_sizes: tuple[int, ...] = ()
    if conv_split and isinstance(tensor_names, Mapping):   # with shapes: transformers' own split of the channels
        sizes = [{tuple(info.shape)[0] for n, info in tensor_names.items() if n.endswith("." + part)} for part in split]
        if all(len(s) == 1 for s in sizes):
            split_sizes = tuple(next(iter(s)) for s in sizes)
    if linear is not None:
        types = config.get("layer_types")
        la = spec.linear_attention
        if types is None and la.full_every:   # as transformers' config class fills the list in
            every = _positive_int(config, la.full_every_key, where) if config.get(la.full_every_key) is not None \
                else la.full_every
            types = ["full_attention" if (i + 1) % every == 0 else la.layer_type for i in range(layers)]
            if la.last_full and "full_attention" not in types:
                types[-1] = "full_attention"
            config["layer_types"] = types
        if not isinstance(types, list) or len(types) < layers:
            raise WiscaError(f"{where}: layer_types must list each of the {layers} layers' kind "
                             f"({spec.linear_attention.layer_type} or full_attention) for {spec.name}")
    att = spec.attention
    if att.nope_interval and not config.get(att.rope_layers):   # as transformers fills the list in
        every = _positive_int(config, att.nope_interval, where)
        config[att.rope_layers] = [int((i + 1) % every != 0) for i in range(layers)]
    kv_shared = int(config.get(spec.attention.kv_shared) or 0) if spec.attention.kv_shared else 0
    if kv_shared:   # every reused layer type must be produced by an earlier layer (transformers checks it too)
        types = config.get("layer_types") or []
        first = layers - kv_shared
        if first <= 0 or len(types) < layers or not set(types[first:layers]) <= set(types[:first]):
            raise WiscaError(f"{where}: {spec.attention.kv_shared}={kv_shared}: the layers sharing keys and values "
                             f"need an earlier layer of their type in layer_types (of {layers} layers)")
    dense_key = moe.dense_intermediate if moe and moe.dense_intermediate else "intermediate_size"
    act_key = spec.mlp.act
    return Layout(
        spec=spec, config=config, hidden=hidden, layers=layers,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=_positive_int(config, dense_key, where),
        vocab=_positive_int(config, "vocab_size", where),
        eps=float(config.get(spec.norm.eps, 1e-6)),
        act=str(config.get(act_key, "silu")) if act_key else "silu",
        tie_embeddings=bool(config.get("tie_word_embeddings", spec.embedding.tied_default)),
        rope_theta=float(theta), rope_scaling=scaling, rotary_dims=rotary_dims,
        sliding_window=int(window) if window else None,
        experts=experts, expert_intermediate=expert_inter, shared_intermediate=shared_inter, mla=mla,
        fused_experts=fused, mxfp4_experts=quantized, fp8_block=fp8_block,
        fp8_weights=frozenset(fp8_weight_names(tensor_names)) if fp8_block and tensor_names is not None else frozenset(),
        linear=linear, conv_split=conv_split, conv_split_sizes=split_sizes,
    )


def fp8_scale_name(weight: str) -> str:
    """``...q_b_proj.weight`` -> ``...q_b_proj.weight_scale_inv`` (as transformers names it)."""
    return weight[:-len("weight")] + fp8.SCALE_NAME


def fp8_weight_names(tensor_names) -> list[str]:
    """The weights of a checkpoint stored FP8 block-quantised: those with a weight_scale_inv beside."""
    names = set(tensor_names)
    return [n for n in names if n.endswith(".weight") and fp8_scale_name(n) in names]


def _fp8_block(quant: dict, key: str, where: str) -> tuple[int, int]:
    """weight_block_size of an FP8 quantization_config (transformers' FineGrainedFP8Config: [128, 128]
    when left out), after checking the format is the one wisca reads: e4m3 codes, float32 block
    scales, activations quantised dynamically (a static scheme stores activation scales that a
    rescaled input would need rescaled too)."""
    checks = (("fmt", "e4m3"), ("scale_fmt", "float"), ("activation_scheme", "dynamic"),
              ("expert_dtype", "fp8"))
    for field_name, wanted in checks:
        got = quant.get(field_name, wanted)
        if got != wanted:
            raise WiscaError(f"{where}: {key}: {field_name} {json.dumps(got)} is not supported "
                             f"(FP8 checkpoints are read with {field_name} {json.dumps(wanted)})")
    block = quant.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and
            all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise WiscaError(f"{where}: {key}: weight_block_size {json.dumps(block)} is not supported "
                         f"(FP8 checkpoints are read with per-block scales, two positive integers)")
    return int(block[0]), int(block[1])


def logical_shapes(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """Logical role -> shape in the W[out, in] convention, before fusing or transposing."""
    layout = layout.at(layer)
    h, d = layout.hidden, layout.head_dim
    q_out, kv_out, inter = layout.heads * d, layout.kv_heads * d, layout.intermediate
    shapes = {
        "attn_norm": (h,), "mlp_norm": (h,), "post_attn_norm": (h,), "post_mlp_norm": (h,),
        "attn_norm_bias": (h,), "mlp_norm_bias": (h,),
        "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
        "q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,), "o_bias": (h,),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
        "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (h,),
        "router": (layout.experts, h), "router_bias": (layout.experts,), "router_correction": (layout.experts,),
        "shared_gate": (1, h), "sinks": (layout.heads,),
        "layer_scalar": (1,), "router_norm": (h,), "router_expert_scale": (layout.experts,),
        "expert_norm": (h,), "post_dense_norm": (h,), "post_expert_norm": (h,), "ple_norm": (h,),
        "ple_gate": (layout.ple_size, h), "ple_proj": (h, layout.ple_size),
    }
    if layout.spec.attention.output_gate:   # q_proj's rows: [q d | gate d] per head
        shapes["q"], shapes["q_bias"] = (2 * q_out, h), (2 * q_out,)
    lin = layout.linear
    if lin:
        keys, values = lin.key_heads * lin.key_dim, lin.value_heads * lin.value_dim
        shapes.update({
            "lin_q": (keys, h), "lin_k": (keys, h), "lin_v": (values, h), "lin_z": (values, h),
            "lin_b": (lin.value_heads, h), "lin_a": (lin.value_heads, h),
            "lin_conv": (2 * keys + values, 1, lin.conv_kernel), "lin_dt_bias": (lin.value_heads,),
            "lin_A_log": (lin.value_heads,), "lin_norm": (lin.value_dim,), "lin_out": (h, values),
        })
        # saved in parts: any split of the channels (transformers 5.25 saves OLMo-hybrid's in
        # near-equal thirds, not q | k | v); validate checks that they add up
        shapes.update({part: (-1, 1, lin.conv_kernel) for part in CONV_PARTS})
        if layout.spec.linear_attention.kind == "mamba2":   # groups x state (B, C), heads x head dim (x, z)
            conv = 2 * keys + values
            shapes.update({"lin_in": (values + conv + lin.value_heads, h), "lin_conv_bias": (conv,),
                           "lin_D": (lin.value_heads,), "lin_norm": (values,)})
    mla = layout.mla
    if mla:
        heads, qk = layout.heads, mla.nope + mla.rope
        shapes.update({
            "q": (heads * qk, h), "q_a": (mla.q_lora, h), "q_a_bias": (mla.q_lora,), "q_a_norm": (mla.q_lora,),
            "q_b": (heads * qk, mla.q_lora), "kv_a": (mla.kv_lora + mla.rope, h), "kv_a_bias": (mla.kv_lora + mla.rope,),
            "kv_a_norm": (mla.kv_lora,), "kv_b": (heads * (mla.nope + mla.v), mla.kv_lora), "o": (h, heads * mla.v),
        })
    comp = layout.spec.attention.compressed
    if comp is not None:   # DeepSeek-V4's attention, its compressor and indexer, the hyper-connections
        c, d, n = layout.config, layout.head_dim, layout.streams
        q_lora, groups, rank = c.get("q_lora_rank") or 0, c.get(comp.o_groups) or 1, c.get(comp.o_rank) or 0
        ih, idim = c.get(comp.index_heads) or 0, c.get(comp.index_head_dim) or 0
        rates = c.get(comp.rates) or {}
        kind = layout.layer_type(layer)
        wide = 2 * d if kind == comp.sparse_type else d   # overlapping windows: two series per token
        shapes.update({
            "q_a": (q_lora, h), "q_a_norm": (q_lora,), "q_b": (layout.heads * d, q_lora), "kv": (d, h), "kv_norm": (d,),
            "o_a": (groups * rank, layout.heads * d // groups), "o_b": (h, groups * rank),
            "comp_kv": (wide, h), "comp_gate": (wide, h), "comp_bias": (int(rates.get(kind) or 0), wide), "comp_norm": (d,),
            "idx_kv": (2 * idim, h), "idx_gate": (2 * idim, h), "idx_bias": (int(rates.get(comp.sparse_type) or 0), 2 * idim),
            "idx_norm": (idim,), "idx_q": (ih * idim, q_lora), "idx_w": (ih, h),
            "router_table": (layout.vocab, int(layout.value(layout.spec.moe.top_k, 0)) if layout.spec.moe else 0),
        })
        for sub in ("attn", "mlp"):
            shapes.update({f"hc_{sub}_fn": ((2 + n) * n, n * h), f"hc_{sub}_base": ((2 + n) * n,), f"hc_{sub}_scale": (3,)})
    qk_norm = layout.spec.attention.qk_norm
    if qk_norm:
        shapes["q_norm"], shapes["k_norm"] = {"head": ((d,), (d,)), "heads": ((layout.heads, d), (layout.kv_heads, d)),
                                              "full": ((q_out,), (kv_out,))}[qk_norm]
        shapes["q_norm_bias"], shapes["k_norm_bias"] = ((shapes["q_norm"][-1],), (shapes["k_norm"][-1],)) \
            if qk_norm == "head" else (shapes["q_norm"], shapes["k_norm"])
    for prefix, n in (("shared.", layout.shared_intermediate), *((f"experts.{e}.", layout.expert_intermediate)
                                                                 for e in range(layout.experts))):
        shapes.update({prefix + "gate": (n, h), prefix + "up": (n, h), prefix + "down": (h, n)})
    for fused, info in (layout.spec.moe.fused_experts.items() if layout.fused_experts else ()):
        shapes["experts." + fused] = stored = layout.fused_expert_shape(fused)
        if layout.mxfp4_experts:   # [E, out, in] as MXFP4 blocks and scales
            o, i = stored[info.dims.index("out")], stored[info.dims.index("in")]
            shapes.update({f"experts.{fused}_{p}": shape for p, shape in mxfp4.shapes(layout.experts, o, i).items()})
        shapes["experts." + fused + "_bias"] = layout.fused_expert_shape(fused, bias=True)
    return shapes


def extra_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Full tensor name -> expected shape of the tensors outside the layers that the embed and final
    stages carry beside the embedding, final norm and head (Gemma 4's per-layer input embeddings,
    DeepSeek-V4's hyper head)."""
    out: dict[str, tuple[int, ...]] = {}
    ple = layout.spec.per_layer_input
    if layout.ple_size:
        width = layout.layers * layout.ple_size
        out.update({ple.embed: (int(layout.value(ple.vocab, layout.vocab)), width),
                    ple.projection: (width, layout.hidden), ple.norm: (layout.ple_size,)})
    hyper = layout.spec.block.hyper
    if hyper is not None:
        n = layout.streams
        out.update({hyper.head_fn: (n, n * layout.hidden), hyper.head_base: (n,), hyper.head_scale: (1,)})
    return out


def expected_shapes(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """Full tensor name -> expected shape (as stored) for one decoder layer."""
    shapes = logical_shapes(layout, layer)
    for fused, info in layout.spec.fused.items():
        first = shapes[info.parts[0]]
        shapes[fused] = (sum(shapes[p][0] for p in info.parts), *first[1:])
        shapes[fused + "_bias"] = (shapes[fused][0],)
    if layout.spec.linear == "conv1d":
        shapes = {role: tuple(reversed(s)) if len(s) == 2 else s for role, s in shapes.items()}
    roles = layout.layer_roles(layer)
    for role in roles:
        if role.endswith(fp8.SCALE_SUFFIX):   # an FP8 weight's block scales
            shapes[role] = fp8.scale_shape(shapes[role[:-len(fp8.SCALE_SUFFIX)]], layout.fp8_block)
    return {name: shapes[role] for role, name in roles.items()}


MATRIX_TARGETS = ("qk", "vo", "ffn", "norm", "experts")
MATRIX_WORDS = {"exact": "exact", "tolerance": "within tolerance", "not applicable": "not applicable"}


def support_matrix() -> list[dict[str, str]]:
    """One row per family: model_type(s) and, per target, exact / within tolerance / not
    applicable with the default power-of-two scales. ``experts``: the ffn target on every
    routed (and shared) expert of an MoE family; a target kept to some layers (``target_layers``)
    says which. ``trainer``: a transformers Trainer checkpoint's optimizer moments follow the
    weights bit for bit (powers of two divide exactly, whatever the weights' own exactness); an
    MoE family's moments are those of the experts fused in memory (``fused.py``). The README
    table is checked against this."""
    rows = []
    for spec in sorted(shipped_specs().values(), key=lambda s: s.name):
        row = {"family": spec.name, "model_type": ", ".join(spec.model_types)}
        for target in MATRIX_TARGETS:
            applies = ("ffn" in spec.targets and spec.moe is not None) if target == "experts" else target in spec.targets
            key = "ffn" if target == "experts" else target
            row[target] = MATRIX_WORDS["not applicable" if not applies else
                                       "tolerance" if key in spec.inexact_targets else "exact"]
            rule = spec.target_layers.get(target) if applies else None
            if rule is not None:   # e.g. "exact (NoPE layers only with use_qk_norm)"
                row[target] += f" ({'RoPE' if rule.only == 'rope' else 'NoPE'} layers only" + \
                    (f" with {rule.when})" if isinstance(rule.when, str) else ")")
            if applies and spec.attention.kv_shared and key == "qk":   # Gemma 4: see KV_SHARED_WHY
                row[target] += " (layers with their own keys only)"
            if applies and spec.linear_attention and key in ("qk", "vo"):
                row[target] += " (full-attention layers only)"
            if applies and spec.linear_attention and key in spec.linear_attention.full_attention_lacks:
                row[target] += " (linear-attention layers only)"
        # the targets that hold on a hybrid family's linear-attention layers
        mixer = {"gated_deltanet": "Gated DeltaNet", "mamba2": "Mamba2"}
        conv = ["conv (" + ("tolerance" if "conv" in spec.inexact_targets else "exact") + ")"] \
            if "conv" in spec.targets else []
        row["linear"] = "-" if spec.linear_attention is None else mixer[spec.linear_attention.kind] + ": " + ", ".join(
            [f"{t} ({row[t].split(' (')[0]})" for t in ("norm", "ffn")
             if t in spec.targets and not (t == "ffn" and spec.block.kinds)] + conv)   # one sub-block: no MLP beside it
        row["trainer"] = "exact, fused experts" if spec.moe is not None else "exact"
        rows.append(row)
    return rows


MATRIX_COLUMNS = (*MATRIX_TARGETS, "linear", "trainer")
MATRIX_HEADINGS = {"trainer": "Trainer checkpoint", "linear": "linear-attention layers"}


def support_matrix_markdown() -> str:
    head = "| family | `model_type` | " + " | ".join(MATRIX_HEADINGS.get(c, c) for c in MATRIX_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (2 + len(MATRIX_COLUMNS))]
    for r in support_matrix():
        lines.append(f"| {r['family']} | `{r['model_type']}` | " + " | ".join(r[c] for c in MATRIX_COLUMNS) + " |")
    return "\n".join(lines)
