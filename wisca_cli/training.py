"""Carry a training run's optimizer state into the transformed parametrisation.

If a parameter becomes ``W' = S * W`` (S broadcast over the tensor), its gradient becomes
``g / S``, so every optimizer moment that is a sum of gradient powers ``g**p`` becomes
``moment / S**p``: Adam/AdamW ``exp_avg / S``, ``exp_avg_sq / S**2`` (and ``max_exp_avg_sq``
with amsgrad), SGD ``momentum_buffer / S``, Adagrad ``sum / S**2``. ``step`` and the
param groups (lr, betas, weight decay) are untouched. With power-of-two scales every
division is exact, so ``undo`` (``invert=True``) restores the moments bit for bit.

Two file formats are understood, found in the checkpoint folder as ``optimizer.pt``,
``optimizer.bin`` (accelerate) or ``optim.pt``:

``hf-trainer``
    ``torch.optim.Optimizer.state_dict()``: ``state`` keyed by position (0, 1, ...), the
    positions listed in ``param_groups[i]["params"]``. transformers' ``Trainer`` builds two
    groups from ``model.named_parameters()`` (``Trainer.create_optimizer``): first every
    trainable parameter that gets weight decay, then every other one, each in
    ``named_parameters()`` order; ``state_dict()`` numbers the parameters group after group.
    A weight's name is therefore recovered from the model's parameter order, which only
    the modeling code knows: it is rebuilt with transformers (installed wherever a Trainer
    checkpoint is made) from ``config.json`` on the meta device (no memory, no weights).
    The decay split is tried with every rule transformers has used (no decay for names
    matching ``bias``/``norm`` patterns; older versions: ``bias`` and ``nn.LayerNorm``
    weights; and the installed ``Trainer.get_decay_parameter_names``) and as one group
    (an optimizer built from ``model.parameters()``); a candidate must match the group
    sizes, name only tensors of the checkpoint and give every moment its parameter's shape.
    If no candidate fits, or two fit with different scales, nothing is written and a
    ``WiscaError`` names the file. A parameter need not be one checkpoint tensor:
    transformers 5 renames some modules in memory and fuses MoE experts
    (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) that
    ``save_pretrained`` writes per expert; ``fused.parameter_layout`` says which saved
    tensors each parameter holds and where, from transformers' own conversion mapping, and a
    fused moment is scaled by the multiplier assembled from its experts' (``Param.multiplier``).
    Each rule is also tried in the per-expert layout of transformers 4.x (one moment per
    expert tensor, in the spec's ``moe.expert_order``). PEFT adapter checkpoints (``adapter_config.json``) are
    mapped the same way through PEFT's model (trainable parameters only, ``.default``
    dropped from the names); the base model's ``config.json`` comes from ``base`` or from
    the adapter's ``base_model_name_or_path``.
``by-name``
    ``{"state": {name: {...}}, "param_groups": [{"params": [names...], ...}]}``, what
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns (save it
    with ``torch.save`` as ``optimizer.pt`` in the checkpoint folder). Names are the model's
    parameter names; ``module.`` / ``_orig_mod.`` wrapper prefixes and PEFT's ``.default``
    are dropped before matching the checkpoint's tensor names; names of the in-memory model
    that are not tensors of the checkpoint (fused MoE experts) are mapped through its layout.

Anything else that looks like an optimizer state (an optimizer whose state keys are not
known to transform by a power of the gradient, e.g. Adafactor or 8-bit states, a file that
cannot be read with ``weights_only=True``, DeepSpeed ``global_step*`` folders, FSDP
``optimizer_*`` folders, per-rank files) is refused before anything is written: resuming from
it would apply moments of the old parametrisation to the rescaled weights, or (DeepSpeed)
restore the old weights themselves. ``training_state="drop"`` is the explicit opt-out: the
output leaves every optimizer and engine state out (``plan_training_state``), and the report
says how to resume from the weights alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WiscaError, reason
from .formats import INDEX_NAME
from .fused import Param, identity, parameter_layout

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optim.pt")
# state key -> p: the entry is a sum of gradient powers g**p, so it becomes entry / S**p
ADAM_KEYS = {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2, "mu_product": 0}
FAMILIES = {                      # family -> (keys with their power, keys that identify it)
    "adam": (ADAM_KEYS, {"exp_avg", "exp_avg_sq"}),
    "adamax": ({"step": 0, "exp_avg": 1, "exp_inf": 1}, {"exp_inf"}),
    "sgd": ({"step": 0, "momentum_buffer": 1}, {"momentum_buffer"}),
    "adagrad": ({"step": 0, "sum": 2}, {"sum"}),
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
PEFT_ADAPTER_SEGMENT = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.default(?=\.|$)")


# -- finding the state -------------------------------------------------------------------------
def find_optimizer_state(folder: Path) -> tuple[Path | None, list[str]]:
    """(the optimizer file wisca can read, other optimizer states it cannot)."""
    folder = Path(folder)
    found = [folder / n for n in OPTIMIZER_FILES if (folder / n).is_file()]
    if len(found) > 1:
        raise WiscaError(f"{folder}: several optimizer states ({', '.join(p.name for p in found)}); "
                         f"keep the one the training run resumes from")
    others = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = entry.name
        if entry.is_dir() and (re.fullmatch(r"global_step\d+(_universal)?", name) or name.startswith("optimizer")):
            others.append(name + "/")           # DeepSpeed engine state, FSDP sharded optimizer
        elif entry.is_file() and re.fullmatch(r"rank\d+-of-\d+-optimizer\.pt|.*_optim_states\.pt|"
                                              r"optimizer_\d+\.(?:bin|pt)", name):
            others.append(name)                 # XLA FSDP per-rank files
    return (found[0] if found else None), others


RESUME_WITHOUT_STATE = ("resume from the weights alone: load the output's model and start a fresh optimizer "
                        "(HF Trainer: resume_from_checkpoint keeps the scheduler and step and starts the "
                        "optimizer afresh when optimizer.pt is absent)")


def _refuse(where: str, why: str) -> WiscaError:
    return WiscaError(f"{where}: {why}; wisca cannot rescale it, so resuming from it would mix the old "
                      f"parametrisation with the new weights; nothing written (to write the weights without "
                      f"it, pass `training_state` drop)", fields=("training_state",))


def plan_training_state(src: Path, mode: str = "transform") -> set[str]:
    """Before any work is done: the names of ``src``'s files and folders that hold training
    state to leave out of the output (``mode`` "drop": all of them; "transform": none).
    With "transform", raises ``WiscaError`` naming the state for any state wisca cannot
    rescale exactly (an engine folder, an unknown optimizer, an unreadable file), so nothing
    is written. Only the state's structure is read here (memory-mapped); the mapping to
    parameters comes with ``transform_training_state``."""
    src = Path(src)
    path, others = find_optimizer_state(src)
    if mode == "drop":
        return {p for p in [path.name if path else None, *[o.rstrip("/") for o in others]] if p} | \
            ({n for n in ("latest", "latest_universal") if (src / n).is_file()}
             if any(o.startswith("global_step") for o in others) else set())
    engines = _deepspeed_engines(src, path, others)
    if engines:
        for engine in engines:
            _deepspeed_params(src, engine, None)
        return {e.folder.name for e in engines}        # written by transform_training_state, not copied
    _no_other_state(src, path, others)
    if path is not None:
        _readable_state(path)
    return set()


def _deepspeed_engines(src: Path, path: Path | None, others: list[str]) -> list:
    """The DeepSpeed engine states of ``src`` (``deepspeed.read_engines``), [] without one."""
    if not any(o.startswith("global_step") for o in others):
        return []
    rest = [o for o in others if not o.startswith("global_step")]
    if path is not None or rest:
        _no_other_state(src, path, rest or others)
    if (src / "adapter_config.json").is_file():
        raise _refuse(str(src / [o for o in others if o.startswith("global_step")][0].rstrip("/")),
                      "DeepSpeed engine state of a LoRA adapter, which wisca does not map yet")
    from .deepspeed import read_engines_or_refuse

    return read_engines_or_refuse(src)


def _deepspeed_params(src: Path, engine, weight_names: list[str] | None) -> dict:
    """DeepSpeed parameter name -> ``fused.Param`` (the checkpoint tensors it holds)."""
    where = str(engine.folder)
    shapes = tensor_shapes(src)
    if weight_names:
        known = set(weight_names)
        shapes = {n: s for n, s in shapes.items() if n in known}
    names = list(engine.shapes)
    sd = {"state": {}, "param_groups": [{"params": names}]}
    params = _by_name_mapping(src, sd, where, shapes).params
    for name, p in params.items():
        if tuple(p.shape) != engine.shapes[name]:
            raise WiscaError(f"{where}: parameter {name} has shape {list(engine.shapes[name])} in DeepSpeed's "
                             f"param_shapes, {list(p.shape)} in the checkpoint; nothing written")
    return params


def _no_other_state(src: Path, path: Path | None, others: list[str]) -> None:
    if path is not None and others:
        raise WiscaError(f"{path}: the folder also holds other optimizer states ({', '.join(others)}); "
                         f"keep only the one the training run resumes from")
    if others:
        raise _refuse(str(src / others[0].rstrip("/")), _engine_reason(others[0]))


def _engine_reason(name: str) -> str:
    if name.startswith("global_step"):
        return ("DeepSpeed engine state (fp32 master weights and moments; a DeepSpeed resume loads its weights "
                "from here, not from the safetensors)")
    if name.endswith("/"):
        return "a sharded optimizer state folder"
    return "a per-rank optimizer state file"


def _readable_state(path: Path) -> tuple[dict, str, dict[str, int], str]:
    """(state dict, family, key -> power, display name) of a state wisca can rescale."""
    try:
        sd = _load(path)
    except Exception as e:   # noqa: BLE001 - pickled objects, corrupt files: refused
        raise _refuse(str(path), f"cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                                 f"{reason(e, 120)})") from None
    problem = _structure_problem(sd)
    if problem:
        raise _refuse(str(path), problem)
    family, powers, name = _family(sd)
    if family is None:
        raise _refuse(str(path), name)
    return sd, family, powers, name


# -- reading ---------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    """The state dict, memory-mapped where the file format allows it, tensors only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):   # legacy (non-zip) format: no mmap
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _structure_problem(sd) -> str | None:
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) \
            or not isinstance(sd.get("param_groups"), list):
        return "not a torch optimizer state dict (expected keys 'state' and 'param_groups')"
    for g in sd["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            return "a param group without a 'params' list"
    for key, entry in sd["state"].items():
        if not isinstance(entry, dict):
            return f"state of {key!r} is not a dict"
    return None


def _family(sd: dict) -> tuple[str | None, dict[str, int], str]:
    """(family, key -> power, display name), or (None, {}, reason) for an unknown optimizer."""
    keys = set()
    for entry in sd["state"].values():
        keys |= set(entry)
    if not keys:
        return "empty", {}, _display_name("empty", sd)
    for family, (powers, marks) in FAMILIES.items():
        if marks <= keys and keys <= set(powers):
            return family, powers, _display_name(family, sd)
    return None, {}, f"optimizer state keys {sorted(keys)} are not those of Adam, AdamW, NAdam, RAdam, " \
                     f"Adamax, SGD or Adagrad"


def _display_name(family: str, sd: dict) -> str:
    group = sd["param_groups"][0] if sd["param_groups"] else {}
    if family == "adam":
        if "momentum_decay" in group:
            return "NAdam"
        if "amsgrad" in group:
            return "AdamW" if group.get("decoupled_weight_decay", False) else "Adam"
        return "RAdam"
    return {"adamax": "Adamax", "sgd": "SGD", "adagrad": "Adagrad", "empty": "(no state yet)"}[family]


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a checkpoint or adapter folder (headers only)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).is_file()]
    shapes = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


# -- positional (HF Trainer) order ------------------------------------------------------------
def _parameter_names(model, forbidden_types: tuple, patterns: list) -> list[str]:
    """transformers.trainer_pt_utils.get_parameter_names, restated (it is the decay rule)."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, forbidden_types):
            continue
        out += [f"{name}.{n}" for n in _parameter_names(child, forbidden_types, patterns)
                if not any(p.search(f"{name}.{n}".lower()) for p in patterns)]
    out += [k for k in model._parameters if not any(p.search(k.lower()) for p in patterns)]
    return out


def _decay_rules(model) -> dict[str, set[str]]:
    """Rule -> the names that get weight decay, for every rule Trainer has used."""
    import torch.nn as nn

    current = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    rules = {
        "Trainer groups (no decay: bias and *norm* names)": set(_parameter_names(model, (nn.LayerNorm,), current)),
        "older Trainer groups (no decay: bias and nn.LayerNorm)":
            {n for n in _parameter_names(model, (nn.LayerNorm,), []) if "bias" not in n},
    }
    try:   # the installed Trainer's own rule, should it have changed again
        from transformers import Trainer

        installed = Trainer.get_decay_parameter_names(None, model)   # uses only its model argument
        rules["installed Trainer.get_decay_parameter_names groups"] = set(installed)
    except Exception:   # noqa: BLE001 - an optional cross-check
        pass
    return rules


def _meta_model(config_dir: Path, where: str):
    """The model class of config.json, built on the meta device (no memory, no weights)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise WiscaError(f"{where}: lists parameters by position (HF Trainer); rebuilding the model's parameter "
                         f"order needs transformers: pip install transformers") from e
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            return cls._from_config(config) if cls is not None else AutoModelForCausalLM.from_config(config)
    except Exception as e:   # noqa: BLE001 - any failure of transformers here is a bad input
        raise WiscaError(f"{where}: cannot rebuild the model from {config_dir}/config.json to map the optimizer's "
                         f"parameter positions: {type(e).__name__}: {reason(e, 200)}") from e


def _adapter_base_config(src: Path, base: Path | None, where: str) -> Path:
    if base is not None:
        return Path(base)
    cfg = json.loads((src / "adapter_config.json").read_text())
    name = cfg.get("base_model_name_or_path")
    if name and Path(name).is_dir():
        return Path(name)
    if name:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, allow_patterns=["config.json"],
                                          revision=cfg.get("revision")))
        except Exception:   # noqa: BLE001
            pass
    raise WiscaError(f"{where}: lists adapter parameters by position; rebuilding their order needs the base "
                     f"model's config.json: pass the base model folder (`base`)", fields=("base",))


def _trainer_candidates(src: Path, where: str, adapter: bool, base: Path | None) -> dict[str, list[list[Param]]]:
    """Rule -> the parameters per param group, as Trainer.create_optimizer builds them: each
    with the checkpoint tensors it holds (``fused.parameter_layout``: transformers 5 fuses
    MoE experts in memory). Where some are fused, each rule also comes in the per-expert
    layout of transformers 4.x (one 2-D moment per expert tensor, ``_per_expert``)."""
    if adapter:
        model = _meta_model(_adapter_base_config(src, base, where), where)
        try:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig.from_pretrained(str(src))
            config.inference_mode = False          # saved adapters say True: their parameters frozen
            with torch.device("meta"):
                model = get_peft_model(model, config)
        except ImportError as e:
            raise WiscaError(f"{where}: lists adapter parameters by position; rebuilding their order needs "
                             f"peft: pip install peft") from e
        except Exception as e:   # noqa: BLE001
            raise WiscaError(f"{where}: cannot rebuild the PEFT model to map the optimizer's parameter positions: "
                             f"{type(e).__name__}: {reason(e, 200)}") from e
        layout = {n: identity(checkpoint_name(n), tuple(p.shape)) for n, p in model.named_parameters()}
    else:
        model = _meta_model(src, where)
        try:
            layout = parameter_layout(model)
        except WiscaError as e:
            raise WiscaError(f"{where}: {e}") from e
    named = [(n, p.requires_grad) for n, p in model.named_parameters()]
    trainable = [n for n, grad in named if grad]
    rules = {"one group (model.parameters())": [trainable]}
    for rule, decay in _decay_rules(model).items():
        rules[rule] = [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]
    out = {rule: [[layout[n] for n in g] for g in groups] for rule, groups in rules.items()}
    if any(p.fused for p in layout.values()):
        ranks = _expert_ranks(src)
        for rule, groups in list(out.items()):
            per_expert = _per_expert(groups, ranks)
            if per_expert is not None:
                out[f"{rule}, experts per expert (transformers 4.x)"] = per_expert
    return out


def _expert_ranks(src: Path) -> dict[str, tuple[int, int]]:
    """Checkpoint tensor name of an expert -> (expert, place in its module), from the spec
    (``moe.expert_order``); {} when the family has no spec."""
    from .spec import layout_from_config

    try:
        layout = layout_from_config(json.loads((src / "config.json").read_text()))
    except (WiscaError, OSError, ValueError):
        return {}
    moe = layout.spec.moe
    if moe is None:
        return {}
    ranks = {}
    for layer in range(layout.layers):
        for role, name in layout.layer_roles(layer).items():
            parts = role.split(".")
            if len(parts) == 3 and parts[0] == "experts" and parts[2] in moe.expert_order:
                ranks[name] = (int(parts[1]), moe.expert_order.index(parts[2]))
    return ranks


def _per_expert(groups: list[list[Param]], ranks: dict) -> list[list[Param]] | None:
    """The param groups as a model with one module per expert lists them (transformers 4.x):
    the fused parameters of one experts module replaced, where the first of them stood, by
    their checkpoint tensors, expert by expert in the spec's ``expert_order``; every other
    parameter under its checkpoint name."""
    out = []
    for group in groups:
        new, done = [], set()
        for p in group:
            if not p.fused:
                new.append(identity(p.saved[0], p.shape))
                continue
            module = p.name.rsplit(".", 1)[0]
            if module in done:
                continue
            done.add(module)
            pieces = [q for other in group if other.fused and other.name.rsplit(".", 1)[0] == module
                      for q in other.pieces]
            if not all(q.saved in ranks for q in pieces):
                return None
            new += [identity(q.saved, q.shape) for q in sorted(pieces, key=lambda q: ranks[q.saved])]
        out.append(new)
    return out


# -- name -> checkpoint tensor ---------------------------------------------------------------
def checkpoint_name(name: str) -> str:
    """A training-time parameter name as the checkpoint stores it."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    name = name.replace("._orig_mod.", ".").replace("._checkpoint_wrapped_module.", ".")
    return PEFT_ADAPTER_SEGMENT.sub(r".\1", name)


@dataclass
class _Mapping:
    params: dict[object, Param]    # state key -> the parameter and the checkpoint tensors it holds
    order: str                     # how the names were found

    @property
    def names(self) -> dict:
        """State key -> checkpoint tensor name; a fused parameter (pieces of several
        checkpoint tensors, e.g. ``mlp.experts.gate_up_proj``) -> its in-memory name."""
        return {k: p.name if p.fused else p.saved[0] for k, p in self.params.items()}


def _resolve(p: Param, shapes: dict[str, tuple[int, ...]]) -> Param:
    """A parameter the checkpoint stores whole under its in-memory name (experts saved
    fused) is that tensor, whatever transformers would have saved."""
    if p.fused and shapes.get(p.name) == p.shape:
        return identity(p.name, p.shape)
    return p


def _check(sd: dict, params: dict[object, Param], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why this key -> parameter mapping cannot be right (None: it is consistent)."""
    for key, p in params.items():
        for piece in p.pieces:
            if piece.saved not in shapes:
                held = f" (held by the in-memory {p.name})" if p.fused else ""
                return f"parameter {piece.saved}{held} (state {key!r}) is not a tensor of the checkpoint"
            if piece.shape != shapes[piece.saved]:
                return (f"parameter {piece.saved} has shape {shapes[piece.saved]} in the checkpoint, but "
                        f"{list(piece.shape)} in the in-memory {p.name}")
        for k, t in sd["state"].get(key, {}).items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != p.shape:
                return (f"state {key!r} {k} has shape {tuple(t.shape)} but "
                        f"{p.name if p.fused else p.saved[0]} has {p.shape}")
    return None


def _same_scales(a: dict[object, Param], b: dict[object, Param], multipliers: dict) -> str | None:
    for key in a:
        ma, mb = a[key].multiplier(multipliers), b[key].multiplier(multipliers)
        if ma is None and mb is None:
            continue
        if ma is None or mb is None or ma.shape != mb.shape or not torch.equal(ma, mb):
            return f"position {key} is {a[key].name} or {b[key].name}, which scale differently"
    return None


def _likely_reason(reasons: dict[str, str]) -> str:
    """The one reason worth a line, out of every parameter order tried."""
    # a rule whose group sizes fitted got furthest: its reason is the specific one
    closest = [why for why in reasons.values() if not why.startswith("the model has")]
    first = (closest or list(reasons.values()) or ["no parameter order fits"])[0]
    return first if len(first) <= 160 else first[:157] + "..."


def _positional_mapping(src: Path, sd: dict, where: str, shapes: dict, multipliers: dict,
                        adapter: bool, base: Path | None) -> _Mapping:
    groups = [list(g["params"]) for g in sd["param_groups"]]
    flat = [k for g in groups for k in g]
    if not all(isinstance(k, int) for k in flat) or flat != list(range(len(flat))):
        raise WiscaError(f"{where}: param_groups do not number the parameters 0, 1, 2, ... in order; "
                         f"not a torch optimizer state dict wisca can map")
    stray = sorted(set(sd["state"]) - set(flat))
    if stray:
        raise WiscaError(f"{where}: state for position {stray[0]} which no param group lists")
    fits, reasons = {}, {}
    for rule, params_by_group in _trainer_candidates(src, where, adapter, base).items():
        if [len(g) for g in params_by_group] != [len(g) for g in groups]:
            reasons[rule] = (f"the model has {sum(len(g) for g in params_by_group)} trainable parameters in groups of "
                             f"{[len(g) for g in params_by_group]}, the optimizer {[len(g) for g in groups]}")
            continue
        params = {k: _resolve(p, shapes) for g, gp in zip(groups, params_by_group) for k, p in zip(g, gp)}
        problem = _check(sd, params, shapes)
        if problem:
            reasons[rule] = problem
        else:
            fits[rule] = params
    if not fits:
        raise WiscaError(f"{where}: cannot map the optimizer's parameter positions to the checkpoint's tensors "
                         f"({_likely_reason(reasons)})",
                         details=[f"{rule}: {why}" for rule, why in reasons.items()])
    rules = list(fits)
    for rule in rules[1:]:
        clash = _same_scales(fits[rules[0]], fits[rule], multipliers)
        if clash:
            raise WiscaError(f"{where}: ambiguous parameter order ({rules[0]} and {rule} both fit, but {clash}); "
                             f"not transforming it")
    return _Mapping(fits[rules[0]], f"HF Trainer param groups rebuilt from the model on the meta device: "
                                    f"{', '.join(rules)}")


def _by_name_mapping(src: Path, sd: dict, where: str, shapes: dict) -> _Mapping:
    listed = [n for g in sd["param_groups"] for n in g["params"]]
    if len(set(listed)) != len(listed):
        raise WiscaError(f"{where}: a parameter name is listed in two param groups")
    stray = sorted(set(sd["state"]) - set(listed))
    if stray:
        raise WiscaError(f"{where}: state for {stray[0]!r} which no param group lists")
    names = {n: checkpoint_name(n) for n in listed}
    layout = {}
    if any(n not in shapes for n in names.values()) and not (src / "adapter_config.json").is_file():
        # names of the in-memory model (fused MoE experts, renamed modules): its layout says
        # which checkpoint tensors they hold
        try:
            layout = parameter_layout(_meta_model(src, where))
        except WiscaError as e:
            raise WiscaError(f"{where}: {e}") from e
    params = {n: _resolve(layout[c], shapes) if c not in shapes and c in layout
              else identity(c, shapes.get(c, ())) for n, c in names.items()}
    problem = _check(sd, params, shapes)
    if problem:
        raise WiscaError(f"{where}: {problem}")
    return _Mapping(params, "parameter names stored in the state dict")


# -- scaling ---------------------------------------------------------------------------------
def _is_pow2(x: torch.Tensor, dtype: torch.dtype) -> bool:
    info = torch.finfo(dtype)
    mant, _ = torch.frexp(x)
    return bool(((mant == 0.5) & (x >= info.tiny) & (x <= info.max)).all())


def scale_moment(t: torch.Tensor, s: torch.Tensor, power: int, invert: bool) -> torch.Tensor:
    """``t / S**power`` (``t * S**power`` when inverting), rounded once to t's dtype:
    the symmetry core's multiplier application (``balance.apply_multiplier``)."""
    from .balance import apply_multiplier

    return apply_multiplier(t, s, power if invert else -power)


def _save(sd: dict, target: Path) -> None:
    """torch.save beside the target, then rename over it. The file keeps its name while
    written: torch names the archive inside after it, so an undo gives the same bytes."""
    from .output import discard_staged, staged_dir

    try:
        tmp = staged_dir(target.parent, target.name)
    except OSError as e:
        raise WiscaError(f"{target.parent}: cannot write beside {target.name}: {e.strerror or e}") from e
    try:
        torch.save(sd, tmp / target.name)
        os.replace(tmp / target.name, target)
    except OSError as e:
        raise WiscaError(f"{target}: writing the transformed optimizer state failed: {e.strerror or e}") from e
    finally:
        discard_staged(tmp)


@dataclass
class _State:
    path: Path
    sd: dict
    fmt: str                       # "hf-trainer" or "by-name"
    powers: dict[str, int]
    name: str                      # optimizer, for the record
    mapping: _Mapping


def _read_state(src: Path, weight_names: list[str] | None, multipliers: dict, base: Path | None) -> "_State | dict":
    """The optimizer state of src with its entries mapped to tensor names ({} when there is
    none); ``WiscaError`` for a state wisca cannot rescale (``plan_training_state``)."""
    path, others = find_optimizer_state(src)
    _no_other_state(src, path, others)
    if path is None:
        return {}
    where = str(path)
    sd, family, powers, name = _readable_state(path)
    keys = [k for g in sd["param_groups"] for k in g["params"]]
    if all(isinstance(k, int) for k in keys) and all(isinstance(k, int) for k in sd["state"]):
        fmt = "hf-trainer"
    elif all(isinstance(k, str) for k in keys) and all(isinstance(k, str) for k in sd["state"]):
        fmt = "by-name"
    else:
        raise _refuse(where, "param_groups list parameters neither all by position nor all by name")
    shapes = tensor_shapes(src)
    if weight_names:
        known = set(weight_names)
        shapes = {n: s for n, s in shapes.items() if n in known}
    from .formats import is_adapter

    if fmt == "hf-trainer":
        mapping = _positional_mapping(src, sd, where, shapes, multipliers, is_adapter(src), base)
    else:
        mapping = _by_name_mapping(src, sd, where, shapes)
    return _State(path, sd, fmt, powers, name, mapping)


def optimizer_parameter_names(src: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    """State key (position or name) -> checkpoint tensor name, as transform_training_state maps
    the optimizer state of ``src`` ({} when there is none or it is not transformable); a
    parameter fused in memory from several checkpoint tensors (transformers 5's
    ``mlp.experts.gate_up_proj``) -> its in-memory name (``fused.parameter_layout`` lists
    the tensors it holds)."""
    found = _read_state(Path(src), None, {}, Path(base) if base is not None else None)
    return found.mapping.names if isinstance(found, _State) else {}


# -- the seam -------------------------------------------------------------------------------
def transform_training_state(src: Path, dst: Path, multipliers: dict[str, torch.Tensor],
                             weight_names: list[str], invert: bool = False, *,
                             base: Path | None = None, mode: str = "transform") -> dict:
    """Rescale the optimizer state of ``src`` for weights ``W' = S * W``; write it into ``dst``.

    Called after the transformed tensors are in ``dst`` and every other file of ``src``
    has been copied there (this overwrites ``dst/optimizer.pt``; ``scheduler.pt``,
    ``rng_state*.pth``, ``trainer_state.json``, ``training_args.bin`` stay as copied).

    ``multipliers``: checkpoint tensor name -> float64 S broadcastable to the tensor (names
    absent: S = 1), e.g. ``api.scale_multipliers(dst)``. ``weight_names``: the checkpoint's
    tensor names; every optimizer entry must map to one of them. ``invert``: apply ``S``
    instead of ``1/S`` (undo). ``base``: for a PEFT adapter checkpoint with a positional
    state, the base model folder whose ``config.json`` rebuilds the parameter order.

    ``mode``: "transform", or "drop" (the caller left the state out of ``dst``:
    ``plan_training_state(src, "drop")`` named it; this only reports it).

    Returns a JSON-able record: ``{}`` when there is no optimizer state;
    ``{"optimizer": {"file", "format": "hf-trainer"|"by-name", "optimizer": "AdamW", "transformed": True,
    "tensors": N, "parameters": P, "scaled_parameters": K, "order": ..., "exact": bool,
    "underflow": n, "accounting": {state key: {"scaled": a, "untouched": b, "copied": c}}}}``
    (every entry counted: rescaled, of a parameter whose multiplier is 1, or a key that no
    rescaling changes, e.g. ``step``); with "drop", ``{"optimizer": {"file", "transformed":
    False, "dropped": [names], "resume": how}}``.
    Raises ``WiscaError("<file>: <problem>")`` for a state wisca cannot rescale, when a known
    optimizer's entries cannot be mapped to the checkpoint's tensors unambiguously, or a
    moment would overflow.
    """
    src, dst = Path(src), Path(dst)
    if mode == "drop":
        dropped = sorted(plan_training_state(src, "drop"))
        return {"optimizer": {"file": ", ".join(dropped), "transformed": False, "dropped": dropped,
                              "resume": RESUME_WITHOUT_STATE}} if dropped else {}
    path, others = find_optimizer_state(src)
    engines = _deepspeed_engines(src, path, others)
    if engines:
        from .deepspeed import transform as transform_engine

        records = [transform_engine(e, dst, _deepspeed_params(src, e, weight_names), multipliers, invert)
                   for e in engines]
        return {"optimizer": records[0], **({"universal": records[1]} if len(records) > 1 else {})}
    found = _read_state(src, weight_names, multipliers, base)
    if not isinstance(found, _State):
        return found
    path, sd, fmt, powers, name, mapping = found.path, found.sd, found.fmt, found.powers, found.name, found.mapping
    where = str(path)
    new_state, tensors, scaled, underflow, names = {}, 0, {}, 0, mapping.names
    accounting: dict[str, dict[str, int]] = {}

    def count(k: str, how: str) -> None:
        accounting.setdefault(k, {"scaled": 0, "untouched": 0, "copied": 0})[how] += 1

    for key, entry in sd["state"].items():
        s = mapping.params[key].multiplier(multipliers)
        if s is None or bool((s == 1).all()):
            for k in entry:
                count(k, "untouched" if powers.get(k, 0) else "copied")
            new_state[key] = entry
            continue
        new_entry = {}
        for k, t in entry.items():
            p = powers.get(k, 0)
            if p and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                raise WiscaError(f"{where}: {k} of {names[key]} is not a floating-point tensor, so it cannot "
                                 f"follow its parameter's rescaling; nothing written")
            if p == 0:
                count(k, "copied")
                new_entry[k] = t
                continue
            count(k, "scaled")
            out = scale_moment(t, s, p, invert)
            if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
                raise WiscaError(f"{where}: {k} of {names[key]} overflows when scaled; nothing written")
            info = torch.finfo(t.dtype)
            underflow += int(((t != 0) & (out.abs() < info.tiny)).sum())
            new_entry[k] = out
            tensors += 1
        scaled[names[key]] = s
        new_state[key] = new_entry
    exact = underflow == 0 and all(_is_pow2(m.double(), torch.float32) for m in scaled.values())
    if scaled:
        _save({**sd, "state": new_state}, dst / path.name)
    return {"optimizer": {
        "file": path.name, "format": fmt, "optimizer": name, "transformed": True, "tensors": tensors,
        "parameters": len(names), "scaled_parameters": len(scaled), "order": mapping.order,
        "direction": "S (undo)" if invert else "1/S", "exact": exact, "underflow": underflow,
        "accounting": accounting,
    }}
