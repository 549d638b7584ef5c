"""Architecture specs: what a model family's checkpoint looks like, as data.

Each family is one small JSON file in ``architectures/``: tensor names by role, the
norm and MLP kind, the rotary style, and the WISCA targets that apply. ``Layout``
combines a spec with a checkpoint's ``config.json`` into the numbers the math needs
(heads, kv heads, head dim, ...). Nothing here reads tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from .errors import WiscaError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    embed: str
    final_norm: str
    lm_head: str
    layer_prefix: str
    norm: dict
    layer_tensors: dict[str, str]          # role -> name inside the layer
    optional_tensors: dict[str, dict]      # role -> {"name", "when": bool | config key}
    attention: dict
    mlp: dict
    targets: tuple[str, ...]
    inexact_targets: tuple[str, ...] = ()   # round even with pow2 scales: verified with a tolerance
    # Optional fields (absent: the llama behaviour). See docs/architectures.md.
    config_keys: dict = field(default_factory=dict)   # canonical config key -> this family's key
    linear: str = "linear"            # "linear": W[out, in]; "conv1d" (GPT-2): W[in, out]
    fused: dict = field(default_factory=dict)         # fused role -> {"parts": [...], "layout": concat|heads}
    block: dict = field(default_factory=dict)         # {"parallel_residual": bool | key, "residual_multiplier": key}
    moe: dict = field(default_factory=dict)           # experts: counts, tensors, router, shared expert
    embedding: dict = field(default_factory=dict)     # {"scale": "sqrt_hidden" | key, "positions": name}
    final: dict = field(default_factory=dict)         # {"norm_bias": name, "softcap": key, "logits_divisor": key}

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer) + suffix


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key != "extends":
            out[key] = value
    return out


@lru_cache(maxsize=None)
def _raw_specs() -> dict[str, dict]:
    files = resources.files(__package__) / "architectures"
    raw = {}
    for entry in files.iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            raw[data["name"]] = data
    return raw


def _resolve(name: str, raw: dict[str, dict]) -> dict:
    data = raw[name]
    if "extends" in data:
        return _merge(_resolve(data["extends"], raw), data)
    return data


@lru_cache(maxsize=None)
def all_specs() -> dict[str, ArchSpec]:
    """model_type -> spec, for every family shipped."""
    raw = _raw_specs()
    by_type = {}
    for name in raw:
        d = _resolve(name, raw)
        spec = ArchSpec(
            name=d["name"], model_types=tuple(d["model_types"]), embed=d["embed"],
            final_norm=d["final_norm"], lm_head=d["lm_head"], layer_prefix=d["layer_prefix"],
            norm=d["norm"], layer_tensors=d["layer_tensors"],
            optional_tensors=d.get("optional_tensors", {}), attention=d["attention"],
            mlp=d["mlp"], targets=tuple(d["targets"]),
            inexact_targets=tuple(d.get("inexact_targets", ())),
            config_keys=d.get("config_keys", {}), linear=d.get("linear", "linear"),
            fused=d.get("fused", {}), block=d.get("block", {}), moe=d.get("moe", {}),
            embedding=d.get("embedding", {}), final=d.get("final", {}),
        )
        for model_type in spec.model_types:
            by_type[model_type] = spec
    return by_type


def supported_model_types() -> list[str]:
    return sorted(all_specs())


def spec_for(model_type: str | None, where: str = "config.json") -> ArchSpec:
    specs = all_specs()
    if model_type not in specs:
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

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def config_flag(self, when: Any) -> bool:
        if isinstance(when, bool):
            return when
        return bool(self.config.get(when, False))

    def value(self, key: Any, default: Any = None) -> Any:
        """A config value named by a spec field (a literal number or bool passes through)."""
        if key is None:
            return default
        if isinstance(key, (bool, int, float)):
            return key
        got = self.config.get(key)
        return default if got is None else got

    # -- per layer ---------------------------------------------------------------------------
    def layer_type(self, layer: int) -> str | None:
        types = self.config.get("layer_types")
        return types[layer] if isinstance(types, list) and layer < len(types) else None

    def rope_at(self, layer: int) -> tuple[float, dict | None]:
        """(theta, scaling) of one layer: Gemma3 keeps rope parameters per layer type."""
        rope = self.config.get("rope_parameters") or {}
        kind = self.layer_type(layer)
        if kind and isinstance(rope.get(kind), dict):
            rope = rope[kind]
            scaling = rope if rope.get("rope_type", "default") != "default" else None
            return float(rope.get("rope_theta", self.rope_theta)), scaling
        return self.rope_theta, self.rope_scaling

    def rotary_dims_at(self, layer: int) -> int:
        """Rotary dims of one layer: 0 on SmolLM3's NoPE layers."""
        key = self.spec.attention.get("rope_layers")
        flags = self.config.get(key) if key else None
        if isinstance(flags, list) and layer < len(flags) and not flags[layer]:
            return 0
        return self.rotary_dims

    def window_at(self, layer: int) -> int | None:
        kind = self.layer_type(layer)
        if kind is not None and kind != "sliding_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        moe = self.spec.moe
        if not moe or not self.experts:
            return False
        if layer in (self.config.get(moe.get("dense_layers", ""), None) or []):
            return False
        step = self.value(moe.get("sparse_step"), 1) or 1
        return (layer + 1) % step == 0

    def layer_roles(self, layer: int) -> dict[str, str]:
        """role -> full tensor name for one decoder layer (required and enabled optional)."""
        spec = self.spec
        roles = {role: spec.layer_name(layer, name) for role, name in spec.layer_tensors.items()}
        for role, opt in spec.optional_tensors.items():
            if self.config_flag(opt["when"]):
                roles[role] = spec.layer_name(layer, opt["name"])
        moe = spec.moe
        if moe:
            if self.is_moe_layer(layer):
                roles["router"] = spec.layer_name(layer, moe["router"])
                for e in range(self.experts):
                    for role, name in moe["expert_tensors"].items():
                        roles[f"experts.{e}.{role}"] = spec.layer_name(layer, name.format(expert=e))
                if self.shared_intermediate:
                    for role, name in moe.get("shared_tensors", {}).items():
                        roles[f"shared.{role}"] = spec.layer_name(layer, name)
                    if moe.get("shared_gate"):
                        roles["shared_gate"] = spec.layer_name(layer, moe["shared_gate"])
            else:
                roles.update({role: spec.layer_name(layer, name)
                              for role, name in moe.get("dense_tensors", {}).items()})
        return roles

    def fused_parts(self, fused_role: str) -> dict[str, torch.Tensor]:
        """part -> positions (along the output axis) of that part inside a fused tensor.

        ``concat``: parts one after the other (Phi-3 qkv_proj, gate_up_proj, GPT-2 c_attn);
        ``heads``: per head [q d | k d | v d] (GPT-NeoX query_key_value)."""
        info = self.spec.fused[fused_role]
        sizes = [self.part_size(p) for p in info["parts"]]
        if info.get("layout", "concat") == "heads":
            d, n = self.head_dim, len(sizes)
            heads = torch.arange(self.heads)[:, None] * (n * d)
            return {p: (heads + i * d + torch.arange(d)[None, :]).reshape(-1) for i, p in enumerate(info["parts"])}
        out, start = {}, 0
        for p, size in zip(info["parts"], sizes):
            out[p] = torch.arange(start, start + size)
            start += size
        return out

    def part_size(self, role: str) -> int:
        return {"q": self.heads * self.head_dim, "k": self.kv_heads * self.head_dim,
                "v": self.kv_heads * self.head_dim, "gate": self.intermediate, "up": self.intermediate}[role]

    def fused_of(self, role: str) -> str | None:
        """The fused tensor holding a logical role (``q`` -> ``qkv``), or None."""
        for fused, info in self.spec.fused.items():
            if role in info["parts"]:
                return fused
        return None


def _need(config: dict, key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise WiscaError(f"{where}: missing required field {key!r}")
    return config[key]


def _positive_int(config: dict, key: str, where: str) -> int:
    value = _need(config, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise WiscaError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def layout_from_config(config: dict, where: str = "config.json") -> Layout:
    if not isinstance(config, dict):
        raise WiscaError(f"{where}: expected a JSON object")
    spec = spec_for(config.get("model_type"), where)
    # a family's own key names (GPT-2's n_embd, ...) under the canonical ones
    config = {**config, **{canon: config[key] for canon, key in spec.config_keys.items()
                           if config.get(key) is not None}}
    if config.get("intermediate_size") is None and spec.mlp.get("intermediate_default"):
        config["intermediate_size"] = int(spec.mlp["intermediate_default"]) * config.get("hidden_size", 0)
    hidden = _positive_int(config, "hidden_size", where)
    heads = _positive_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise WiscaError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    head_dim = (config.get("head_dim") if spec.attention.get("head_dim_key", True) else None) or hidden // heads
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
    rotary_dims = int(head_dim * partial) if spec.attention.get("rotary") else 0
    rotary_dims -= rotary_dims % 2

    window = None
    window_key = spec.attention.get("sliding_window")
    if window_key:
        enabled_key = spec.attention.get("sliding_window_enabled")
        if enabled_key is None or config.get(enabled_key, False):
            window = config.get(window_key)

    moe, experts, expert_inter, shared_inter = spec.moe, 0, 0, 0
    if moe:
        experts = _positive_int(config, moe["num_experts"], where)
        expert_inter = _positive_int(config, moe["intermediate"], where) if moe.get("intermediate") else \
            _positive_int(config, "intermediate_size", where)
        if moe.get("shared_intermediate"):
            shared_inter = int(config.get(moe["shared_intermediate"]) or 0)

    act_key = spec.mlp.get("act")
    return Layout(
        spec=spec, config=config, hidden=hidden,
        layers=_positive_int(config, "num_hidden_layers", where),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=_positive_int(config, "intermediate_size", where),
        vocab=_positive_int(config, "vocab_size", where),
        eps=float(config.get(spec.norm["eps"], 1e-6)),
        act=str(config.get(act_key, "silu")) if act_key else "silu",
        tie_embeddings=bool(config.get("tie_word_embeddings", spec.embedding.get("tied_default", False))),
        rope_theta=float(theta), rope_scaling=scaling, rotary_dims=rotary_dims,
        sliding_window=int(window) if window else None,
        experts=experts, expert_intermediate=expert_inter, shared_intermediate=shared_inter,
    )


def logical_shapes(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """Logical role -> shape in the W[out, in] convention, before fusing or transposing."""
    h, d = layout.hidden, layout.head_dim
    q_out, kv_out, inter = layout.heads * d, layout.kv_heads * d, layout.intermediate
    shapes = {
        "attn_norm": (h,), "mlp_norm": (h,), "post_attn_norm": (h,), "post_mlp_norm": (h,),
        "attn_norm_bias": (h,), "mlp_norm_bias": (h,),
        "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
        "q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,), "o_bias": (h,),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
        "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (h,),
        "router": (layout.experts, h), "shared_gate": (1, h),
    }
    qk_norm = layout.spec.attention.get("qk_norm")
    if qk_norm:
        shapes["q_norm"], shapes["k_norm"] = ((d,), (d,)) if qk_norm == "head" else ((q_out,), (kv_out,))
    for prefix, n in (("shared.", layout.shared_intermediate), *((f"experts.{e}.", layout.expert_intermediate)
                                                                 for e in range(layout.experts))):
        shapes.update({prefix + "gate": (n, h), prefix + "up": (n, h), prefix + "down": (h, n)})
    return shapes


def expected_shapes(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """Full tensor name -> expected shape (as stored) for one decoder layer."""
    shapes = logical_shapes(layout, layer)
    for fused, info in layout.spec.fused.items():
        first = shapes[info["parts"][0]]
        shapes[fused] = (sum(shapes[p][0] for p in info["parts"]), *first[1:])
        shapes[fused + "_bias"] = (shapes[fused][0],)
    if layout.spec.linear == "conv1d":
        shapes = {role: tuple(reversed(s)) if len(s) == 2 else s for role, s in shapes.items()}
    return {name: shapes[role] for role, name in layout.layer_roles(layer).items()}


MATRIX_TARGETS = ("qk", "vo", "ffn", "norm", "experts")
MATRIX_WORDS = {"exact": "exact", "tolerance": "within tolerance", "not applicable": "not applicable"}


def support_matrix() -> list[dict[str, str]]:
    """One row per family: model_type(s) and, per target, exact / within tolerance / not
    applicable with the default power-of-two scales. ``experts``: the ffn target on every
    routed (and shared) expert of an MoE family. The README table is checked against this."""
    rows, seen = [], set()
    for spec in sorted(all_specs().values(), key=lambda s: s.name):
        if spec.name in seen:
            continue
        seen.add(spec.name)
        row = {"family": spec.name, "model_type": ", ".join(spec.model_types)}
        for target in MATRIX_TARGETS:
            applies = ("ffn" in spec.targets and bool(spec.moe)) if target == "experts" else target in spec.targets
            key = "ffn" if target == "experts" else target
            row[target] = MATRIX_WORDS["not applicable" if not applies else
                                       "tolerance" if key in spec.inexact_targets else "exact"]
        rows.append(row)
    return rows


def support_matrix_markdown() -> str:
    head = "| family | `model_type` | " + " | ".join(MATRIX_TARGETS) + " |"
    lines = [head, "|" + "---|" * (2 + len(MATRIX_TARGETS))]
    for r in support_matrix():
        lines.append(f"| {r['family']} | `{r['model_type']}` | " + " | ".join(r[t] for t in MATRIX_TARGETS) + " |")
    return "\n".join(lines)
