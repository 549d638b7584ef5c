"""Pretraining frameworks as data: how each one names a family's tensors in its checkpoints.

Each framework is one small JSON file in ``frameworks/``, checked like the family specs
(``spec.py``'s section classes) when first used:

- ``model_prefix`` / ``optimizer_prefix``: the top-level keys of the model's tensors and of
  the optimizer's state (``<optimizer_prefix>state.<parameter>.<key>``);
- ``dcp_folder``: the sub-folder of the saved step that holds the DCP checkpoint, if any
  (OLMo-core's ``stepN/model_and_optim/``; every other file of the step is copied as it is,
  and ``beside`` names the hidden ones to copy too: OLMo-core's ``.metadata.json``);
- ``storage_info``: the classes its ``.metadata`` stores pieces with (read into stand-ins and
  written back under their own names when they are not torch's, ``unpickle.py``);
- ``families``: spec name -> the framework's names for that family (a ``spec.NameAdapter``:
  embedding, final norm, head, layer prefix, every layer role, rotary pairing) and its
  ``fused_state``: a parameter the framework holds fused in memory while its checkpoint holds
  the weights split (torchtitan's ``wqkv``, whose optimizer moments stay fused), with the
  roles it holds and their row layout;
- ``stand_ins``: its other classes a ``.metadata`` pickles, and the torch class each extends
  (megatron-core 0.15's ``MCoreMetadata`` and ``MCoreSavePlan``);
- ``layers``: ``separate`` (a tensor per layer, the layer index in its name) or ``stacked``
  (Megatron-core: one tensor per role with a leading layer axis, each layer one chunk, its
  name the layer prefix without ``{layer}``; wisca sees layer l's chunks as the tensor
  ``<prefix with l>.<name>``); a family's ``fused``: tensors the framework stores fused
  (Megatron's ``linear_qkv`` rows per kv group, ``linear_fc1`` gate then up);
- ``state_key``: where the state key stands in an optimizer entry's name:
  ``<prefix>state.<parameter>.<key>`` (``last``, torch's) or ``<prefix>state.<key>.<parameter>``
  (``first``, Megatron-core's); ``state_powers``: the framework's own state keys and how each
  follows a parameter rescaled by S: ``p`` in entry / S**p (-1 for its fp32 master weights:
  times S, like the weight);
- ``tested``: the release whose own loader reads wisca's output back in the tests.

Nothing here reads tensors or files of a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch

from .errors import WiscaError
from .spec import (FUSABLE_PARTS, MLP_ROLES, FusedExperts, NameAdapter, _bad, _build, _choice, _mapping,
                   _no_entries, _section, _Section, _spec_field, _str_list, _string, package_json)

FUSED_LAYOUTS = ("kv_groups",)   # rows [kv heads, R + 2, head dim]: the group's R q heads, its k, its v


def _power(value, where, path, partial):
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= 2:
        raise _bad(where, path, "an integer power from -1 to 2", value)
    return value


def _prefix(value, where, path, partial):
    """"" or a key prefix ending with '.'."""
    if not isinstance(value, str) or (value and not value.endswith(".")):
        raise _bad(where, path, "\"\" or a prefix ending with '.'", value)
    return value


@dataclass(frozen=True)
class FusedState(_Section):
    """A parameter fused in memory from several layer roles, its checkpoint weights split."""
    name: str = _spec_field(_string)                                  # inside the layer
    parts: tuple[str, ...] = _spec_field(_str_list(FUSABLE_PARTS, nonempty=True))
    layout: str = _spec_field(_choice(*FUSED_LAYOUTS))

    def check(self, where: str, label: str) -> None:
        if self.layout == "kv_groups" and self.parts != ("q", "k", "v"):
            raise WiscaError(f"{where}: {label}: layout kv_groups holds parts [q, k, v], got {list(self.parts)}")


@dataclass(frozen=True)
class MoeNames(_Section):
    """An MoE family's router and 3-D expert tensors under the framework's names."""
    router: str = _spec_field(_string)
    fused_experts: Mapping[str, FusedExperts] = _spec_field(_mapping(_section(FusedExperts)))


@dataclass(frozen=True)
class FamilyNames(NameAdapter):
    fused_state: Mapping[str, FusedState] = _spec_field(_mapping(_section(FusedState)), factory=_no_entries)
    moe: MoeNames | None = _spec_field(_section(MoeNames), None)


@dataclass(frozen=True)
class Framework(_Section):
    name: str = _spec_field(_string)
    tested: str = _spec_field(_string)
    optimizer_prefix: str = _spec_field(_prefix)
    families: Mapping[str, FamilyNames] = _spec_field(_mapping(_section(FamilyNames)))
    model_prefix: str = _spec_field(_prefix, "")
    dcp_folder: str | None = _spec_field(_string, None)
    # files beside the DCP folder that a dot hides from the general copy, copied as they are
    beside: tuple[str, ...] = _spec_field(_str_list(), ())
    storage_info: tuple[str, ...] = _spec_field(_str_list(nonempty=True),
                                                ("torch.distributed.checkpoint.filesystem._StorageInfo",))
    # a framework's own classes in ``.metadata`` beyond storage info -> the torch class each
    # extends (megatron-core 0.15's MCoreMetadata: Metadata), read and written as stand-ins
    stand_ins: Mapping[str, str] = _spec_field(_mapping(_choice("Metadata", "SavePlan")), factory=_no_entries)
    layers: str = _spec_field(_choice("separate", "stacked"), "separate")
    state_key: str = _spec_field(_choice("last", "first"), "last")
    state_powers: Mapping[str, int] = _spec_field(_mapping(_power), factory=_no_entries)

    def stacked_prefix(self, family: str) -> str:
        """The stored name's prefix of a stacked layer tensor (``decoder.layers.``)."""
        return self.families[family].layer_prefix.replace("{layer}.", "")

    def check(self, where: str, label: str) -> None:
        if not self.optimizer_prefix:
            raise WiscaError(f"{where}: optimizer_prefix must not be empty")
        from .spec import shipped_specs

        specs = shipped_specs()
        for family, names in self.families.items():
            if family not in specs:
                raise WiscaError(f"{where}: families.{family}: no such family spec")
            roles, renamed = set(specs[family].layer_tensors), set(names.layer_tensors)
            if names.fused is not None:   # the framework's fused tensors stand for their parts
                parts = {p for f in names.fused.values() for p in f.parts}
                roles = (roles - parts - set(specs[family].fused)) | set(names.fused)
            if self.layers == "stacked" and not names.layer_prefix.endswith("{layer}."):
                raise WiscaError(f"{where}: families.{family}.layer_prefix must end with {{layer}}. "
                                 f"(stacked layers)")
            if roles != renamed:
                raise WiscaError(f"{where}: families.{family} must rename every layer tensor role of the spec "
                                 f"(missing: {', '.join(sorted(roles - renamed)) or '-'}; unknown: "
                                 f"{', '.join(sorted(renamed - roles)) or '-'})")
            if names.moe is not None:
                if specs[family].moe is None:
                    raise WiscaError(f"{where}: families.{family}.moe: {family} has no experts")
                parts = sorted(p for f in names.moe.fused_experts.values() for p in f.parts)
                if parts != sorted(MLP_ROLES):
                    raise WiscaError(f"{where}: families.{family}.moe.fused_experts must hold "
                                     f"{', '.join(MLP_ROLES)} once each, got {', '.join(parts)}")
            for fused in names.fused_state.values():
                missing = [p for p in fused.parts if p not in roles]
                if missing:
                    raise WiscaError(f"{where}: families.{family}.fused_state {fused.name}: part {missing[0]!r} "
                                     f"is not a layer role of {family}")


def load_frameworks(files: Mapping[str, object]) -> dict[str, Framework]:
    """Framework name -> ``Framework`` for framework files (file name -> parsed JSON)."""
    out = {}
    for where, data in files.items():
        fw = _build(Framework, data, where, "", partial=False)
        stem = where.rsplit("/", 1)[-1].removesuffix(".json")
        if fw.name != stem and where.endswith(".json"):
            raise WiscaError(f"{where}: name {fw.name!r} differs from the file name")
        out[fw.name] = fw
    return out


@lru_cache(maxsize=None)
def shipped_frameworks() -> dict[str, Framework]:
    """Framework name -> description, for every file in ``frameworks/`` (checked on first use)."""
    return load_frameworks(package_json("frameworks"))


@lru_cache(maxsize=None)
def optimizer_prefixes() -> tuple[str, ...]:
    """Every known framework's optimizer prefix (torch's own ``optimizer.`` first)."""
    return tuple(dict.fromkeys(["optimizer.", *(f.optimizer_prefix for f in shipped_frameworks().values())]))


def fused_multiplier(fused: FusedState, parts: dict[str, torch.Tensor | None], shapes: dict[str, tuple],
                     kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """The multiplier of a fused parameter, assembled from its parts' (``parts``: role ->
    multiplier broadcastable to the role's weight, or None for 1; ``shapes``: role -> weight
    shape). None when every part keeps 1."""
    if all(m is None for m in parts.values()):
        return None
    cols = shapes[fused.parts[0]][1]
    full = {role: (torch.ones(shapes[role], dtype=torch.float64) if m is None
                   else m.double().expand(shapes[role]).clone()) for role, m in parts.items()}
    g, d = kv_heads, head_dim
    r = shapes["q"][0] // (g * d)
    out = torch.empty(g, r + 2, d, cols, dtype=torch.float64)
    out[:, :r] = full["q"].view(g, r, d, cols)
    out[:, r] = full["k"].view(g, d, cols)
    out[:, r + 1] = full["v"].view(g, d, cols)
    return out.view(g * (r + 2) * d, cols)
