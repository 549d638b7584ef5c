"""DeepSpeed ZeRO engine state: the weights, fp32 masters and Adam moments a DeepSpeed resume
restores, rescaled where they lie inside the flat partitions.

With DeepSpeed on, ``Trainer.train(resume_from_checkpoint=...)`` does not read
``model.safetensors``: ``engine.load_checkpoint`` takes the module from the model-states
file and then the fp32 master partitions (ZeRO 1/2; it copies them over the working
weights), or rebuilds the weights from the fp32 flat groups (ZeRO 3). A transformed
checkpoint must therefore carry the transform into these files, or the resume silently
restores the old weights. The layout (DeepSpeed 0.19, as ``zero_to_fp32.py`` and
``param_slice_mappings`` read it):

``<folder>/latest`` names the tag, ``<folder>/<tag>/`` holds, per data-parallel rank R:

- ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` (``bf16_`` prefixed with the bf16 optimizer);
- ZeRO 1/2: one ``mp_rank_00_model_states.pt`` whose ``module`` holds the full working
  weights; ZeRO 3: ``zero_pp_rank_R_mp_rank_00_model_states.pt`` with empty placeholders.
  ``param_shapes``: one ordered name -> shape dict per optimizer parameter group.
- ZeRO 1/2 optimizer: per group g, ``single_partition_of_fp32_groups[g]`` (flat fp32 masters)
  and ``base_optimizer_state["state"][g]`` (``exp_avg``, ``exp_avg_sq``: flat, same layout).
  Within a group the parameters lie in ``param_shapes`` order at offsets
  ``o_p = sum_{q<p} (n_q + pad_q)`` (``param_alignment_paddings``); the flat buffer is cut
  into ``world`` equal partitions and rank r holds ``[r P, (r+1) P)``. Each rank's
  ``param_slice_mappings`` (name -> numel, start) must agree with this, or nothing is written.
- ZeRO 3 optimizer: ``fp32_flat_groups[j]`` and ``optimizer_state_dict["state"][j]``: each
  parameter is split on its own into ``ceil(n / world)`` pieces (the last zero-padded); a
  rank's flat tensors, concatenated, are its piece of every parameter in ``param_shapes`` order.

With ``W' = S * W``: weights and masters ``* S``, ``exp_avg / S``, ``exp_avg_sq`` and
``max_exp_avg_sq / S**2``; ``step``, the param groups, the loss scaler, the scheduler, stay.
Every other file of the tag folder is copied. Anything else (frozen parameters, tensor or
pipeline parallel files, an optimizer with other state keys, a layout that does not add
up) is refused before anything is written.

The files are read with ``torchsave.read`` (no code runs: DeepSpeed's three pickled classes
become inert stand-ins; deepspeed need not be installed) and rewritten with
``torchsave.rewrite`` (in bounded pieces, each byte read once and written once).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import torchsave
from .errors import WiscaError
from .torchsave import TensorRef

CLASSES = frozenset({("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum")})
MOMENTS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}   # entry / S**p
COPIED_KEYS = {"step"}
TAG = re.compile(r"global_step\d+")
OPTIM = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL3 = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
MODEL12 = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def engine_folders(src: Path) -> list[Path]:
    """The DeepSpeed tag folders a resume from ``src`` can load: the one ``latest`` names and
    the universal one ``latest_universal`` names (``load_universal``), either may be absent."""
    src = Path(src)
    tags = sorted(p.name for p in src.iterdir() if p.is_dir() and TAG.fullmatch(p.name.removesuffix("_universal"))) \
        if src.is_dir() else []
    named = []
    for pointer in ("latest", "latest_universal"):
        if (src / pointer).is_file():
            tag = (src / pointer).read_text().strip()
            if not (src / tag).is_dir():
                raise WiscaError(f"{src / pointer}: names {tag!r}, which is not a folder here")
            named.append(tag)
    if not named and len(tags) == 1:
        named = tags
    others = [t for t in tags if t not in named]
    if others:
        raise WiscaError(f"{src / others[0]}: a DeepSpeed checkpoint {'beside the one `latest` names' if named else 'without a `latest` naming it'} "
                         f"({', '.join(named) or 'none'}); keep only the one the training run resumes from")
    return [src / t for t in named]


def engine_folder(src: Path) -> Path | None:
    """The first of ``engine_folders`` (None without one)."""
    folders = engine_folders(src)
    return folders[0] if folders else None


@dataclass
class Run:
    """Elements ``[first, first + count)`` of parameter ``name`` (flattened) at element
    ``at`` of a flat tensor."""
    name: str
    at: int
    first: int
    count: int


@dataclass
class Flat:
    what: str                      # for messages: "exp_avg of group 0"
    key: str                       # state key the accounting counts it under
    ref: TensorRef
    power: int                     # the entry becomes entry * S**power
    runs: list[Run]


@dataclass
class File:
    name: str
    archive: torchsave.Archive
    flats: list[Flat] = field(default_factory=list)


@dataclass
class Engine:
    folder: Path
    stage: int
    world: int
    shapes: dict[str, tuple[int, ...]]     # every trainable parameter, in param_shapes order
    files: list[File]
    copied: list[str]                      # other files of the folder, copied as they are
    steps: int                             # ``step`` entries (copied)
    bf16: bool
    universal: bool = False                # ds_to_universal's layout: one folder per parameter

    @property
    def describe(self) -> str:
        if self.universal:
            return "DeepSpeed universal checkpoint"
        return f"DeepSpeed ZeRO {self.stage}, {self.world} rank{'s' if self.world > 1 else ''}"


def _where(path: Path, what: str) -> str:
    return f"{path}: {what}"


def _int(x, where: str) -> int:
    if isinstance(x, torchsave.StandIn):     # ZeroStageEnum(2)
        x = x.args[0] if x.args else None
    if not isinstance(x, int):
        raise WiscaError(f"{where}: expected an integer, found {type(x).__name__}")
    return int(x)


def _flat_ref(t, where: str) -> TensorRef:
    if not isinstance(t, TensorRef) or len(t.shape) != 1 or not t.contiguous:
        raise WiscaError(f"{where}: not a flat tensor")
    return t


def read_engines(src: Path) -> list[Engine]:
    """Every engine state under ``src`` mapped to parameters ([] when there is none);
    ``WiscaError`` naming the file for anything wisca cannot rescale exactly."""
    out = []
    for folder in engine_folders(src):
        out.append(_read_universal(folder) if (folder / "zero").is_dir() else _read_tag(folder))
    shapes = [e.shapes for e in out]
    if any(s != shapes[0] for s in shapes[1:]):
        raise WiscaError(f"{out[1].folder}: holds other parameters than {out[0].folder}")
    return out


def read_engines_or_refuse(src: Path) -> list[Engine]:
    """``read_engines``, its refusal naming the opt-out (``training_state`` drop)."""
    try:
        return read_engines(src)
    except WiscaError as e:
        raise WiscaError(f"{e}; wisca cannot rescale it, so nothing is written (to write the weights without the "
                         f"engine state, pass `training_state` drop)", fields=("training_state",)) from None


def _read_tag(folder: Path) -> Engine:
    names = sorted(p.name for p in folder.iterdir())
    for n in names:
        if (folder / n).is_dir():
            raise WiscaError(_where(folder / n, "a folder inside a DeepSpeed checkpoint (a universal or "
                                               "pipeline checkpoint?), which wisca does not rescale yet"))
    optim = {n: OPTIM.fullmatch(n) for n in names if OPTIM.fullmatch(n)}
    model3 = {n: MODEL3.fullmatch(n) for n in names if MODEL3.fullmatch(n)}
    model12 = [n for n in names if MODEL12.fullmatch(n)]
    state_like = [n for n in names if n not in optim and n not in model3 and n not in model12
                  and (n.endswith(".pt") or "optim" in n)]
    if state_like:
        raise WiscaError(_where(folder / state_like[0], "a DeepSpeed state file of a layout wisca does not know "
                                                        "(pipeline or tensor parallel?)"))
    if not optim:
        raise WiscaError(_where(folder, "no zero_pp_rank_*_optim_states.pt: not a ZeRO checkpoint wisca knows "
                                        "(ZeRO disabled keeps the optimizer in the model states)"))
    mp = {m.group(3) for m in optim.values()} | {m.group(2) for m in model3.values()} | \
        {MODEL12.fullmatch(n).group(1) for n in model12}
    if mp != {"00"}:
        raise WiscaError(_where(folder, "tensor (model) parallel ranks (mp_rank_01, ...), which wisca does not "
                                        "rescale yet"))
    bf16 = {bool(m.group(1)) for m in optim.values()}
    if len(bf16) > 1:
        raise WiscaError(_where(folder, "optimizer files with and without the bf16_ prefix"))
    world = len(optim)
    ranks = sorted(int(m.group(2)) for m in optim.values())
    if ranks != list(range(world)):
        raise WiscaError(_where(folder, f"optimizer files of ranks {ranks}: a rank is missing"))
    model_files = sorted(model3) if model3 else model12
    if not model_files:
        raise WiscaError(_where(folder, "no model-states file"))
    if model3 and model12:
        raise WiscaError(_where(folder, "model-states files of ZeRO 3 and of ZeRO 1/2 together"))
    models = [File(n, torchsave.read(folder / n, CLASSES)) for n in model_files]
    first = models[0].archive.obj
    where0 = str(folder / model_files[0])
    if not isinstance(first, dict) or not isinstance(first.get("param_shapes"), list) \
            or not isinstance(first.get("module"), dict):
        raise WiscaError(f"{where0}: no module and param_shapes: not a DeepSpeed model-states file")
    if first.get("optimizer") is not None:
        raise WiscaError(f"{where0}: holds an optimizer (ZeRO disabled), which wisca does not rescale yet")
    if first.get("frozen_param_shapes") or first.get("frozen_param_fragments"):
        raise WiscaError(f"{where0}: frozen parameters, which wisca does not rescale yet")
    dp = first.get("dp_world_size")
    if dp is not None and dp != world:
        raise WiscaError(f"{where0}: dp_world_size {dp}, but {world} optimizer files")
    groups = [[(str(n), tuple(int(d) for d in s)) for n, s in g.items()] for g in first["param_shapes"]]
    shapes = dict(p for g in groups for p in g)
    optims = [File(n, torchsave.read(folder / n, CLASSES)) for n in
              sorted(optim, key=lambda n: int(optim[n].group(2)))]
    stage = _stage(optims[0], folder)
    if (stage == 3) != bool(model3):
        raise WiscaError(_where(folder, f"ZeRO stage {stage} with {'per-rank' if model3 else 'one'} model-states "
                                        f"file{'s' if model3 else ''}"))
    steps = 0
    if stage == 3:
        steps = _map_zero3(folder, groups, optims, world)
    else:
        steps = _map_zero12(folder, groups, optims, world)
    for m in models:
        _map_module(folder, m, shapes, first, stage)
    copied = [n for n in names if n not in optim and n not in model3 and n not in model12]
    return Engine(folder, stage, world, shapes, models + optims, copied, steps, True in bf16)


def _stage(f: File, folder: Path) -> int:
    where = str(folder / f.name)
    obj = f.archive.obj
    osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
    if not isinstance(osd, dict) or "zero_stage" not in osd:
        raise WiscaError(f"{where}: no optimizer_state_dict with a zero_stage: not a DeepSpeed ZeRO optimizer file")
    stage = _int(osd["zero_stage"], where)
    if stage not in (1, 2, 3):
        raise WiscaError(f"{where}: ZeRO stage {stage}, which wisca does not know")
    for other in ("offload", "elastic"):
        if any(other in str(k) for k in osd):
            raise WiscaError(f"{where}: {other} state, which wisca does not rescale yet")
    return stage


def _moments(state: dict, where: str) -> list[tuple[str, object]]:
    """(key, entry) of one flat group's optimizer state; ``step`` counted, unknown keys refused."""
    if not isinstance(state, dict):
        raise WiscaError(f"{where}: an optimizer state entry that is not a dict")
    unknown = sorted(set(state) - set(MOMENTS) - COPIED_KEYS)
    if unknown:
        raise WiscaError(f"{where}: optimizer state keys {unknown} are not Adam's (exp_avg, exp_avg_sq); "
                         f"wisca cannot rescale them")
    return [(k, v) for k, v in state.items() if k in MOMENTS]


def _map_zero12(folder: Path, groups: list, optims: list[File], world: int) -> int:
    steps = 0
    sizes = None
    for r, f in enumerate(optims):
        where = str(folder / f.name)
        osd = f.archive.obj["optimizer_state_dict"]
        masters = osd.get("single_partition_of_fp32_groups")
        base = osd.get("base_optimizer_state")
        if not isinstance(masters, list) or not isinstance(base, dict) or not isinstance(base.get("state"), dict):
            raise WiscaError(f"{where}: no single_partition_of_fp32_groups / base_optimizer_state: not a ZeRO 1/2 "
                             f"optimizer file wisca knows")
        if len(masters) != len(groups):
            raise WiscaError(f"{where}: {len(masters)} parameter groups, the model states {len(groups)}")
        pads = osd.get("param_alignment_paddings")
        # the masters are saved without the group's end padding (the last rank's), the moments with it
        tails = osd.get("group_paddings") if isinstance(osd.get("group_paddings"), list) else [0] * len(masters)
        mine = [_flat_ref(m, f"{where}: fp32 group {g}").numel + int(tails[g]) for g, m in enumerate(masters)]
        if sizes is None:
            sizes = mine
        elif mine != sizes:
            raise WiscaError(f"{where}: partitions of {mine} elements, rank 0's of {sizes}")
        slices = osd.get("param_slice_mappings")
        for g, params in enumerate(groups):
            part = sizes[g]
            pad = pads[g] if isinstance(pads, list) and g < len(pads) else [0] * len(params)
            if len(pad) != len(params):
                raise WiscaError(f"{where}: param_alignment_paddings of group {g} do not match its {len(params)} "
                                 f"parameters")
            runs, o = [], 0
            for (name, shape), p in zip(params, pad):
                n = math.prod(shape)
                lo, hi = max(o, r * part), min(o + n, (r + 1) * part)
                if lo < hi:
                    runs.append(Run(name, lo - r * part, lo - o, hi - lo))
                o += n + int(p)
            if o > part * world:
                raise WiscaError(f"{where}: group {g}'s parameters need {o} elements, its {world} partitions hold "
                                 f"{part * world}")
            _check_slices(where, g, runs, slices)
            steps += _group_flats(f, where, f"group {g}", masters[g], base["state"].get(g), runs,
                                  (part, part - int(tails[g])))
        extra = sorted(set(base["state"]) - set(range(len(groups))))
        if extra:
            raise WiscaError(f"{where}: optimizer state for group {extra[0]}, which param_shapes does not list")
    return steps


def _group_flats(f: File, where: str, group: str, masters: TensorRef, state, runs: list[Run],
                 sizes: tuple[int, ...]) -> int:
    """One flat group's fp32 masters and Adam moments (each ``sizes`` elements long) as
    ``Flat``s of ``f`` over the same runs; 1 if the group has a ``step`` (copied), else 0."""
    f.flats.append(Flat(f"fp32 masters of {group}", "fp32", masters, 1, runs))
    for key, t in _moments(state, f"{where}: state of {group}"):
        ref = _flat_ref(t, f"{where}: {key} of {group}")
        if ref.numel not in sizes:
            raise WiscaError(f"{where}: {key} of {group} has {ref.numel} elements, the masters' partition {sizes[0]}")
        f.flats.append(Flat(f"{key} of {group}", key, ref, -MOMENTS[key], runs))
    return int("step" in state)


def _check_slices(where: str, g: int, runs: list[Run], slices) -> None:
    """The rank's own record of where each parameter lies must agree with the derived layout."""
    if slices is None:
        return
    got = slices[g] if isinstance(slices, list) and g < len(slices) else None
    if not isinstance(got, dict):
        raise WiscaError(f"{where}: param_slice_mappings has no group {g}")
    want = {r.name: (r.count, r.at) for r in runs}
    have = {}
    for name, addr in got.items():
        numel, start = (addr.get("numel"), addr.get("start")) if isinstance(addr, torchsave.StandIn) else (None, None)
        have[str(name)] = (numel, start)
    if have != want:
        bad = sorted(set(have) ^ set(want)) or sorted(n for n in want if have[n] != want[n])
        raise WiscaError(f"{where}: param_slice_mappings disagree with the layout param_shapes and the paddings "
                         f"give (first: {bad[0]})")


def _map_zero3(folder: Path, groups: list, optims: list[File], world: int) -> int:
    steps = 0
    params = [p for g in groups for p in g]
    for r, f in enumerate(optims):
        where = str(folder / f.name)
        osd = f.archive.obj["optimizer_state_dict"]
        flats = osd.get("fp32_flat_groups")
        inner = osd.get("optimizer_state_dict")
        if not isinstance(flats, list) or not isinstance(inner, dict) or not isinstance(inner.get("state"), dict):
            raise WiscaError(f"{where}: no fp32_flat_groups / optimizer_state_dict: not a ZeRO 3 optimizer file "
                             f"wisca knows")
        refs = [_flat_ref(t, f"{where}: fp32 flat group {j}") for j, t in enumerate(flats)]
        bounds = [0]
        for t in refs:
            bounds.append(bounds[-1] + t.numel)
        pieces, o = [], 0                        # (name, at in the rank's concatenation, first, count)
        for name, shape in params:
            n = math.prod(shape)
            c = -(-n // world)
            lo, hi = min(r * c, n), min((r + 1) * c, n)
            pieces.append((name, o, lo, hi - lo))
            o += c
        if o != bounds[-1]:
            raise WiscaError(f"{where}: the parameters' pieces need {o} elements, the flat groups hold {bounds[-1]}; "
                             f"nothing written")
        for j, ref in enumerate(refs):
            a, b = bounds[j], bounds[j + 1]
            runs = []
            for name, at, first, count in pieces:
                lo, hi = max(at, a), min(at + count, b)
                if lo < hi:
                    runs.append(Run(name, lo - a, first + lo - at, hi - lo))
            steps += _group_flats(f, where, f"sub-group {j}", ref, inner["state"].get(j), runs, (ref.numel,))
        extra = sorted(set(inner["state"]) - set(range(len(refs))))
        if extra:
            raise WiscaError(f"{where}: optimizer state for sub-group {extra[0]} without fp32 weights")
    return steps


def _map_module(folder: Path, f: File, shapes: dict, first: dict, stage: int) -> None:
    """The working weights in ``module``: ZeRO 1/2 hold them whole (rescaled, once per
    storage region however many names view it); ZeRO 3 holds empty placeholders."""
    where = str(folder / f.name)
    obj = f.archive.obj
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        raise WiscaError(f"{where}: no module state dict")
    shared = first.get("shared_params") or {}
    buffers = set(first.get("buffer_names") or [])
    seen: dict[tuple[str, int, int], str] = {}
    for name, t in module.items():
        if not isinstance(t, TensorRef):
            raise WiscaError(f"{where}: module entry {name} is not a tensor")
        param = name if name in shapes else shared.get(name) if shared.get(name) in shapes else None
        if t.numel == 0 and stage == 3:
            continue                                   # a ZeRO 3 placeholder
        if param is None:
            if name in buffers:
                continue                               # a buffer: untouched
            raise WiscaError(f"{where}: module entry {name} is neither a parameter nor a buffer DeepSpeed lists")
        if stage == 3:
            raise WiscaError(f"{where}: ZeRO 3 module entry {name} holds data, which wisca does not rescale yet")
        if t.shape != shapes[param] or not t.contiguous:
            raise WiscaError(f"{where}: module entry {name} has shape {list(t.shape)}, param_shapes "
                             f"{list(shapes[param])}")
        region = (t.storage.key, t.offset, t.numel)
        if region in seen:
            if seen[region] != param:
                raise WiscaError(f"{where}: {name} and {seen[region]} share their bytes but are different parameters")
            continue                                   # a tied weight: one region, rescaled once
        seen[region] = param
        f.flats.append(Flat(f"weights {name}", "weights", TensorRef(t.storage, 0, (t.storage.numel,), (1,)), 1,
                            [Run(param, t.offset, 0, t.numel)]))


UNIVERSAL_KEYS = {"fp32": 1, **{k: -p for k, p in MOMENTS.items()}}


def _read_universal(folder: Path) -> Engine:
    """``ds_to_universal``'s output: ``zero/<parameter>/<key>.pt`` (the whole parameter's fp32
    master and moments: a tensor, or ``{"param": tensor, "cat_dim": d}``), ``step.pt``,
    ``zero/optimizer_state.pt`` (param groups, loss scaler) and a copy of the model states."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    model_files = [n for n in names if "/" not in n and (MODEL12.fullmatch(n) or MODEL3.fullmatch(n))]
    strays = [n for n in names if "/" not in n and n not in model_files and n.endswith(".pt")]
    if not model_files or strays:
        raise WiscaError(_where(folder / (strays[0] if strays else ""), "not a universal checkpoint wisca knows "
                                                                       "(its model-states file is missing or another "
                                                                       "state file lies beside it)"))
    models = [File(n, torchsave.read(folder / n, CLASSES)) for n in model_files]
    first = models[0].archive.obj
    where0 = str(folder / model_files[0])
    if not isinstance(first, dict) or not isinstance(first.get("param_shapes"), list):
        raise WiscaError(f"{where0}: no param_shapes: not a DeepSpeed model-states file")
    if first.get("frozen_param_shapes") or first.get("frozen_param_fragments"):
        raise WiscaError(f"{where0}: frozen parameters, which wisca does not rescale yet")
    shapes = {str(n): tuple(int(d) for d in sh) for g in first["param_shapes"] for n, sh in g.items()}
    files, copied, steps = [], [], 0
    params_seen = set()
    for n in names:
        if n in model_files:
            continue
        parts = n.split("/")
        if parts == ["zero", "optimizer_state.pt"]:
            archive = torchsave.read(folder / n, CLASSES)
            if not any(t.numel > 1 for t in torchsave.tensors(archive.obj)):
                copied.append(n)              # from ZeRO 1/2: param groups, loss scaler
                continue
            if not MODEL3.fullmatch(model_files[0]) or not isinstance(archive.obj, dict):
                raise WiscaError(f"{folder / n}: holds tensors, which wisca does not know how to rescale")
            # from ZeRO 3: rank 0's optimizer file (flat groups and their moments), one level up
            f = File(n, dataclasses.replace(archive, obj={"optimizer_state_dict": archive.obj}))
            steps += _map_zero3(folder, [list(shapes.items())], [f], int(first.get("dp_world_size") or 1))
            files.append(f)
            continue
        if len(parts) != 3 or parts[0] != "zero" or not parts[2].endswith(".pt"):
            copied.append(n)                      # not state (e.g. a README); copied as it is
            if n.endswith(".pt"):
                raise WiscaError(f"{folder / n}: a state file where the universal layout has none")
            continue
        param, key = parts[1], parts[2][:-3]
        if param not in shapes:
            raise WiscaError(f"{folder / n}: state of {param}, which param_shapes does not list")
        params_seen.add(param)
        if key == "step":
            copied.append(n)
            steps += 1
            continue
        if key not in UNIVERSAL_KEYS:
            raise WiscaError(f"{folder / n}: state key {key!r} is not Adam's (fp32, exp_avg, exp_avg_sq)")
        archive = torchsave.read(folder / n, CLASSES)
        obj = archive.obj
        ref = obj.get("param") if isinstance(obj, dict) else obj
        if isinstance(obj, dict) and (set(obj) - {"param", "cat_dim"} or obj.get("cat_dim", 0) != 0):
            raise WiscaError(f"{folder / n}: keys {sorted(obj)} (tensor-parallel slicing?), which wisca does not "
                             f"rescale yet")
        flat = isinstance(ref, TensorRef) and ref.shape == (math.prod(shapes[param]),)   # from ZeRO 3: flattened
        if not isinstance(ref, TensorRef) or not (ref.shape == shapes[param] or flat) or not ref.contiguous:
            raise WiscaError(f"{folder / n}: not a {list(shapes[param])} tensor (nor one flattened)")
        f = File(n, archive)
        f.flats.append(Flat(f"{key} of {param}", key, ref, UNIVERSAL_KEYS[key], [Run(param, 0, 0, ref.numel)]))
        files.append(f)
    missing = sorted(set(shapes) - params_seen)
    if missing:
        raise WiscaError(f"{folder / 'zero'}: no state for {missing[0]}")
    stage = 3 if MODEL3.fullmatch(model_files[0]) else 2
    for m in models:
        _map_module(folder, m, shapes, first, stage)
    engine = Engine(folder, stage, len(model_files) if stage == 3 else 1, shapes, models + files, copied, steps,
                    False)
    engine.universal = True
    return engine


def flat_multiplier(m: torch.Tensor, shape: tuple[int, ...], a: int, b: int) -> torch.Tensor:
    """Elements ``[a, b)`` of ``m`` broadcast to ``shape`` and flattened, computed for the
    range only (memory of the range, not of the parameter)."""
    if m.numel() == 1:
        return m.reshape(1).expand(b - a)
    full = m.expand(shape)
    if len(shape) == 1:
        return full[a:b]
    last = shape[-1]
    r0, r1 = a // last, (b - 1) // last + 1
    idx = torch.unravel_index(torch.arange(r0, r1), shape[:-1])
    return full[idx].reshape(-1)[a - r0 * last:b - r0 * last]


def transform(engine: Engine, dst: Path, params: dict, multipliers: dict, invert: bool = False) -> dict:
    """Write ``engine``'s folder into ``dst`` (the output checkpoint folder) with every
    entry rescaled for ``W' = S * W`` (``invert``: back). ``params``: DeepSpeed parameter
    name -> ``fused.Param`` (its checkpoint tensors, for its multiplier)."""
    from .fileio import copy_range

    out = Path(dst) / engine.folder.name
    out.mkdir(parents=True, exist_ok=True)
    mults = {}
    for name in engine.shapes:
        m = params[name].multiplier(multipliers)
        mults[name] = None if m is None or bool((m == 1).all()) else m.double()
    accounting: dict[str, dict[str, int]] = {}
    tally = {"tensors": 0, "underflow": 0}

    def count(key: str, how: str, n: int = 1) -> None:
        accounting.setdefault(key, {"scaled": 0, "untouched": 0, "copied": 0})[how] += n

    jobs = []
    for f in engine.files:
        edits = []
        for flat in f.flats:
            power = -flat.power if invert else flat.power
            for run in flat.runs:
                m = mults[run.name]
                count(flat.key, "untouched" if m is None else "scaled")
                if m is None:
                    continue
                edits.append(torchsave.Edit(flat.ref.storage.key, flat.ref.offset + run.at, run.count,
                                            _scaler(m, engine.shapes[run.name], run.first, power, tally,
                                                    f"{engine.folder / f.name}: {flat.what}, {run.name}",
                                                    flat.ref.dtype)))
            tally["tensors"] += 1
        (out / f.name).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((f.archive, out / f.name, edits))
    # two files at a time (each reads ahead and writes on its own threads); made durable at the end
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2, "wisca-file") as pool:
        for done in [pool.submit(torchsave.rewrite, *job, durable=False) for job in jobs]:
            done.result()
    for _, path, _ in jobs:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if engine.steps:
        count("step", "copied", engine.steps)
    for n in engine.copied:
        src = engine.folder / n
        (out / n).parent.mkdir(parents=True, exist_ok=True)
        fd, od = os.open(src, os.O_RDONLY), os.open(out / n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            copy_range(fd, 0, od, 0, os.fstat(fd).st_size)
            os.fsync(od)
        finally:
            os.close(fd)
            os.close(od)
    from .output import _fsync_dir

    for d in sorted({(out / n).parent for n in [f.name for f in engine.files] + engine.copied}, reverse=True):
        _fsync_dir(d)
    scaled = [n for n, m in mults.items() if m is not None]
    from .balance import _exact_in

    exact = tally["underflow"] == 0 and all(_exact_in(mults[n], torch.float32) for n in scaled)
    return {"file": engine.folder.name + "/",
            "format": "deepspeed-universal" if engine.universal else f"deepspeed-zero{engine.stage}", "engine": engine.describe,
            "optimizer": "Adam/AdamW (DeepSpeed)", "transformed": True, "world_size": engine.world,
            "bf16": engine.bf16, "tensors": tally["tensors"], "parameters": len(engine.shapes),
            "scaled_parameters": len(scaled), "order": "DeepSpeed param_shapes (parameter names)",
            "direction": "S (undo)" if invert else "1/S", "exact": exact, "underflow": tally["underflow"],
            "files": [f.name for f in engine.files], "copied": engine.copied, "accounting": accounting}


def _scaler(m: torch.Tensor, shape: tuple[int, ...], first: int, power: int, tally: dict, where: str,
            dtype: torch.dtype):
    """``fn(values, i)`` for ``torchsave.Edit``: elements ``first + i ...`` of the flattened
    parameter times ``m ** power``. Powers of two the dtype holds multiply in the dtype, a
    row block at a time against the broadcast multiplier (no copy of it); other scales round
    once from float64 (``balance.apply_multiplier_``)."""
    from .balance import _exact_in, apply_multiplier_

    f = m.double() ** power
    exact = _exact_in(f, dtype)
    grows, shrinks = bool((f > 1).any()), bool((f < 1).any())
    info = torch.finfo(dtype)
    last = shape[-1] if shape else 1
    rows = (f.to(dtype) if exact else f).expand(shape).reshape(-1, last) if shape else None

    def multiply(values: torch.Tensor, a: int) -> None:
        if not exact:
            apply_multiplier_(values, flat_multiplier(m, shape, a, a + values.numel()), power)
            return
        if rows is None or f.numel() == 1:
            values.mul_(f.reshape(()).to(dtype))
            return
        b = a + values.numel()
        head = min(b, -(-a // last) * last)                  # a partial first row
        if head > a:
            r = a // last
            values[:head - a].mul_(rows[r, a - r * last:head - r * last])
        tail = max(head, b // last * last)                    # full rows, then a partial last row
        if tail > head:
            values[head - a:tail - a].view(-1, last).mul_(rows[head // last:tail // last])
        if b > tail:
            r = tail // last
            values[tail - a:].mul_(rows[r, :b - tail])

    def fn(values: torch.Tensor, i: int) -> None:
        normal = values.abs() >= info.tiny if shrinks else None
        finite = bool(torch.isfinite(values).all()) if grows else True
        multiply(values, first + i)
        if grows and finite and not bool(torch.isfinite(values).all()):
            raise WiscaError(f"{where}: overflows when scaled")
        if normal is not None:
            lost = int((normal & (values.abs() < info.tiny)).sum())
            if lost:
                with _TALLY:     # files are rewritten two at a time
                    tally["underflow"] += lost
    return fn


_TALLY = threading.Lock()


# -- a checkpoint whose only weights are the engine's (ZeRO 3 without gathered 16-bit weights) -----
def weights_needed(src) -> bool:
    """True for a folder with a DeepSpeed engine state but no safetensors weights: ZeRO 3
    without ``stage3_gather_16bit_weights_on_model_save``, or a bare ``save_checkpoint``
    folder (then the model's config comes with ``config``)."""
    from .formats import INDEX_NAME, SINGLE_NAME

    src = Path(src)
    if not src.is_dir():
        return False
    if (src / SINGLE_NAME).exists() or (src / INDEX_NAME).exists():
        return False
    try:
        return engine_folder(src) is not None
    except WiscaError:
        return True                # let the engine's own reading say what is wrong


def write_weights(engine: Engine, path: Path) -> None:
    """``model.safetensors`` of the fp32 master weights, one parameter in memory at a time,
    gathered from every rank's partitions (each element must be found exactly once)."""
    from .checkpoint import TensorInfo, build_header
    from .fileio import pwrite_all

    places: dict[str, list[tuple[Path, int, int, int]]] = {n: [] for n in engine.shapes}
    for f in engine.files:
        for flat in f.flats:
            if flat.key != "fp32":
                continue
            rec = f.archive.records[flat.ref.storage.key]
            size = flat.ref.dtype.itemsize
            if flat.ref.dtype != torch.float32:
                raise WiscaError(f"{engine.folder / f.name}: {flat.what} is {flat.ref.dtype}, not float32")
            for run in flat.runs:
                places[run.name].append((f.archive.path, rec.data + (flat.ref.offset + run.at) * size,
                                         run.first, run.count))
    infos, at = {}, 0
    for name, shape in engine.shapes.items():
        n = math.prod(shape) * 4
        infos[name] = TensorInfo(name, path.name, "F32", tuple(shape), at, n, at)
        at += n
    header = build_header(list(infos.values()), {"format": "pt"})
    fds: dict[Path, int] = {}
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(out, header, 0)
        for name, shape in engine.shapes.items():
            numel = math.prod(shape)
            t = torch.empty(numel, dtype=torch.float32)
            raw = t.view(torch.uint8).numpy()
            found = 0
            for file, offset, first, count in places[name]:
                fd = fds.setdefault(file, os.open(file, os.O_RDONLY))
                got = os.preadv(fd, [memoryview(raw)[first * 4:(first + count) * 4]], offset)
                if got != count * 4:
                    raise WiscaError(f"{file}: ended early (truncated?)")
                found += count
            if found != numel:
                raise WiscaError(f"{engine.folder}: the fp32 partitions hold {found} of {numel} elements of {name}")
            pwrite_all(out, raw, len(header) + infos[name].rel_start)
        os.fsync(out)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)


class WeightsView:
    """``with WeightsView(src, parent) as folder``: a folder beside the output that mirrors
    ``src`` (links to its entries) plus ``model.safetensors`` written from the engine's fp32
    masters, so the scales are computed and verified on the weights a resume restores.
    Removed on leaving."""

    def __init__(self, src: Path, parent: Path, config=None):
        self.src, self.parent, self.tmp = Path(src), Path(parent), None
        self.config = None if config is None else Path(config)
        if self.config is not None and self.config.is_dir():
            self.config = self.config / "config.json"

    def __enter__(self) -> Path:
        from .output import staged_dir

        if self.config is not None and not self.config.is_file():
            raise WiscaError(f"{self.config}: no such config.json", fields=("config",))
        if self.config is None and not (self.src / "config.json").is_file():
            raise WiscaError(f"{self.src}: a DeepSpeed checkpoint without config.json; pass the model's config.json "
                             f"(`config`)", fields=("config",))
        engine = read_engines_or_refuse(self.src)[0]
        self.tmp = staged_dir(self.parent, self.src.name + "-weights")
        try:
            for entry in sorted(self.src.iterdir()):
                if not entry.name.startswith(".") and not (entry.name == "config.json" and self.config):
                    (self.tmp / entry.name).symlink_to(entry.resolve())
            if self.config is not None:
                (self.tmp / "config.json").symlink_to(self.config.resolve())
            from .formats import SINGLE_NAME

            write_weights(engine, self.tmp / SINGLE_NAME)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.tmp

    def __exit__(self, *exc) -> None:
        from .output import discard_staged

        if self.tmp is not None:
            discard_staged(self.tmp)
            self.tmp = None
