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

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def config_flag(self, when: Any) -> bool:
        if isinstance(when, bool):
            return when
        return bool(self.config.get(when, False))

    def layer_roles(self, layer: int) -> dict[str, str]:
        """role -> full tensor name for one decoder layer (required and enabled optional)."""
        spec = self.spec
        roles = {role: spec.layer_name(layer, name) for role, name in spec.layer_tensors.items()}
        for role, opt in spec.optional_tensors.items():
            if self.config_flag(opt["when"]):
                roles[role] = spec.layer_name(layer, opt["name"])
        return roles


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
    hidden = _positive_int(config, "hidden_size", where)
    heads = _positive_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise WiscaError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise WiscaError(f"{where}: head_dim must be a positive even integer, got {head_dim!r}")

    rope = config.get("rope_parameters") or {}
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

    act_key = spec.mlp.get("act")
    return Layout(
        spec=spec, config=config, hidden=hidden,
        layers=_positive_int(config, "num_hidden_layers", where),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=_positive_int(config, "intermediate_size", where),
        vocab=_positive_int(config, "vocab_size", where),
        eps=float(config.get(spec.norm["eps"], 1e-6)),
        act=str(config.get(act_key, "silu")) if act_key else "silu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=float(theta), rope_scaling=scaling, rotary_dims=rotary_dims,
        sliding_window=int(window) if window else None,
    )


def expected_shapes(layout: Layout, layer: int) -> dict[str, tuple[int, ...]]:
    """Full tensor name -> expected shape for one decoder layer."""
    h, d = layout.hidden, layout.head_dim
    q_out, kv_out, inter = layout.heads * d, layout.kv_heads * d, layout.intermediate
    shapes_by_role = {
        "attn_norm": (h,), "mlp_norm": (h,),
        "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
        "q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,), "o_bias": (h,),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
        "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (h,),
    }
    return {name: shapes_by_role[role] for role, name in layout.layer_roles(layer).items()}
