"""The torch.distributed.checkpoint (DCP) backend: pretraining checkpoints as torchtitan,
FSDP2 loops, Accelerate / HF Trainer (FSDP ``SHARDED_STATE_DICT``) and OLMo-core write them.

A DCP folder is a pickled ``.metadata`` (every tensor's global shape and chunks, and where
each chunk lives: file, offset, length) and ``__R_N.distcp`` files holding the chunks,
each one ``torch.save``'d. This backend reads a decoder layer's chunks (weights and their
optimizer moments), balances the layer with the symmetry core, and writes the chunks
again, each at its own offsets and sizes, into new ``.distcp`` files; untouched chunks
and non-tensor entries (step, lr, param_groups, rng, data loader state) are copied byte
for byte. The output's ``.metadata`` is the source's with the storage table replaced, so
DCP's keys, planner data and chunking are unchanged and ``dcp.load`` reshards it to any
world size.

Under torchrun the layers are split into contiguous blocks, one per rank: each rank reads
and writes disjoint chunks (a layer's statistics never span ranks, so nothing but the
verifier's hidden states and the small storage tables crosses them), the verification's
residual streams are handed from rank to rank, and rank 0 commits the output once every
rank has written and verified its part. See docs/architecture.md.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import mmap
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import chunkbytes, megatron
from .balance import apply_multiplier, apply_multiplier_, chunk_multiplier
from .errors import WiscaError, reason
from .spec import Layout, extra_shapes, layout_from_config

METADATA = ".metadata"
TRAINER_MODEL, TRAINER_OPTIM = "pytorch_model_fsdp_0", "optimizer_0"   # Accelerate's FSDP folders
WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
STATE = "optimizer.state."
# the last segment of a key that is training state wherever it stands (a moment, a master copy)
STATE_LIKE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "exp_inf")
MASTER_LIKE = ("master", "fp32_param", "fp32_weight", "fp32_flat")
# optimizer state key -> p: entries are sums of gradient powers g**p, so they become entry / S**p
MOMENT_POWERS = {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2, "mu_product": 0,
                 "exp_inf": 1, "momentum_buffer": 1, "sum": 2}
MEGATRON_BUCKETS = ("bucket_idx", "dp_group_idx", "param_state_sharding_type")
_DONE: Future = Future()
_DONE.set_result(None)


def _dcp_folders() -> tuple[str, ...]:
    """Sub-folders of a saved step that hold its DCP checkpoint (Trainer's, the frameworks')."""
    from .framework import shipped_frameworks

    return (TRAINER_MODEL, *(f.dcp_folder for f in shipped_frameworks().values() if f.dcp_folder))


def is_dcp(path: str | os.PathLike) -> bool:
    p = Path(path)
    return ((p / METADATA).is_file() or any((p / sub / METADATA).is_file() for sub in _dcp_folders())
            or (p / megatron.TRACKER).is_file())


# -- reading ----------------------------------------------------------------------------------
@dataclass
class Entry:
    """One state-dict entry: a tensor (chunks) or a pickled object (bytes)."""
    key: str
    folder: "Folder"
    indices: list            # MetadataIndex per stored piece (chunks, or the one bytes item)
    dtype: torch.dtype | None = None
    size: tuple[int, ...] = ()

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    def pieces(self):
        """(index, offsets, sizes) per chunk."""
        for idx in self.indices:
            yield idx, tuple(idx.offset or ()), self.folder.chunk_sizes.get(idx)

    def chunk_size(self, idx) -> tuple[int, ...]:
        return tuple(self.folder.chunk_sizes[idx])

    def load(self, idx, raw: bytes | None = None) -> torch.Tensor:
        """One chunk as a tensor (``raw``: its bytes, if already read)."""
        return self.folder.load(idx, raw)

    @property
    def stored(self) -> str:
        """The key this entry's chunks have in the checkpoint's metadata."""
        return self.key

    @property
    def nbytes(self) -> int:
        return sum(self.folder.storage[i].length for i in self.indices)


@dataclass
class LayerView(Entry):
    """Layer ``layer`` of a stacked tensor (Megatron-core: one tensor per role, a leading layer
    axis, each layer its own chunks): a tensor of its own, named with the layer's prefix, whose
    chunks are the stacked tensor's chunks at ``layer`` on axis 0 without that axis."""
    base: Entry | None = None
    layer: int = 0

    def pieces(self):
        for idx in self.indices:
            yield idx, tuple(idx.offset[1:]), self.folder.chunk_sizes[idx][1:]

    def chunk_size(self, idx) -> tuple[int, ...]:
        return tuple(self.folder.chunk_sizes[idx][1:])

    def load(self, idx, raw: bytes | None = None) -> torch.Tensor:
        return self.folder.load(idx, raw)[0]

    @property
    def stored(self) -> str:
        return self.base.key


@dataclass
class Folder:
    """One DCP folder (``rel`` inside the checkpoint: "" or Accelerate's subfolder)."""
    rel: str
    path: Path
    metadata: object
    storage: dict            # MetadataIndex -> _StorageInfo
    chunk_sizes: dict        # MetadataIndex -> chunk sizes
    entries: dict[str, Entry] = field(default_factory=dict)
    _files: dict = field(default_factory=dict, repr=False)

    def read_raw(self, idx) -> bytes:
        info = self.storage[idx]
        path = self.path / info.relative_path
        f = self._files.get(info.relative_path)
        try:
            if f is None:
                f = self._files[info.relative_path] = open(path, "rb")
            f.seek(info.offset)
            raw = f.read(info.length)
        except OSError as e:
            raise WiscaError(f"{path}: cannot read {idx.fqn}: {e.strerror or e}") from e
        if len(raw) != info.length:
            raise WiscaError(f"{path}: file ended while reading {idx.fqn} (truncated checkpoint)")
        return raw

    def read_into(self, idx, buf) -> None:
        """A stored piece's bytes into ``buf`` (exactly its length)."""
        fd, offset, length = self.source(idx)
        view, done = memoryview(buf).cast("B"), 0
        try:
            while done < length:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise WiscaError(f"{self.path / self.storage[idx].relative_path}: file ended while "
                                     f"reading {idx.fqn} (truncated checkpoint)")
                done += got
        except OSError as e:
            raise WiscaError(f"{self.path / self.storage[idx].relative_path}: cannot read {idx.fqn}: "
                             f"{e.strerror or e}") from e

    def source(self, idx) -> tuple[int, int, int]:
        """(file descriptor, offset, length) of a stored piece, for a copy in the kernel."""
        info = self.storage[idx]
        f = self._files.get(info.relative_path)
        if f is None:
            try:
                f = self._files[info.relative_path] = open(self.path / info.relative_path, "rb")
            except OSError as e:
                raise WiscaError(f"{self.path / info.relative_path}: cannot read: {e.strerror or e}") from e
        return f.fileno(), info.offset, info.length

    def load(self, idx, raw: bytes | None = None) -> torch.Tensor:
        """One chunk as a tensor (``raw``: its bytes, if already read)."""
        raw = self.read_raw(idx) if raw is None else raw
        path = self.path / self.storage[idx].relative_path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:   # torch.load raises many kinds on a damaged file
            raise WiscaError(f"{path}: chunk of {idx.fqn} is corrupt ({reason(e, 80)})") from e
        want = self.chunk_sizes[idx]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(want):
            raise WiscaError(f"{path}: chunk of {idx.fqn} is corrupt (not a tensor of shape {list(want)})")
        return t

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _foreign_classes() -> dict[tuple[str, str], str]:
    """(module, class) of the frameworks' own classes in a ``.metadata`` (``frameworks/*.json``:
    storage-info classes, ``stand_ins``) -> the torch class each extends."""
    from .framework import shipped_frameworks

    out = {}
    for fw in shipped_frameworks().values():
        out.update({tuple(c.rsplit(".", 1)): "_StorageInfo" for c in fw.storage_info
                    if c != "torch.distributed.checkpoint.filesystem._StorageInfo"})
        out.update({tuple(c.rsplit(".", 1)): base for c, base in fw.stand_ins.items()})
    return out


def _read_metadata(folder: Path):
    """The folder's ``Metadata``, read by an unpickler that admits DCP's own classes only."""
    from torch.distributed.checkpoint.metadata import Metadata

    from .unpickle import load_dcp_metadata

    path = folder / METADATA
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            md = load_dcp_metadata(f, str(path), _foreign_classes())
    except OSError as e:
        raise WiscaError(f"{path}: cannot read: {e.strerror or e}") from e
    if not isinstance(md, Metadata):
        raise WiscaError(f"{path}: not a torch.distributed.checkpoint metadata file")
    return md


def open_folder(path: Path, rel: str) -> Folder:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = _read_metadata(path)
    where = path / METADATA
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise WiscaError(f"{where}: no file storage table (written by a storage writer wisca does not know)")
    for idx, info in storage.items():
        if not isinstance(info, _StorageInfo):
            raise WiscaError(f"{where}: {idx.fqn} is stored as {type(info).__name__}, which wisca cannot read")
        if info.transform_descriptors:
            raise WiscaError(f"{where}: {idx.fqn} is stored with DCP transforms "
                             f"({', '.join(info.transform_descriptors)}), which wisca cannot rewrite")
    sizes = {}
    for rel_path in sorted({info.relative_path for info in storage.values()}):
        f = path / rel_path
        if not f.is_file():
            raise WiscaError(f"{f}: data file named in {METADATA} not found")
        sizes[rel_path] = f.stat().st_size
    for idx, info in storage.items():
        if info.offset + info.length > sizes[info.relative_path]:
            raise WiscaError(f"{path / info.relative_path}: file is shorter than {METADATA} says "
                             f"(truncated checkpoint)")
    by_fqn: dict[str, list] = {}
    for idx in storage:
        by_fqn.setdefault(idx.fqn, []).append(idx)
    folder = Folder(rel, path, md, storage, {})
    for key, meta in md.state_dict_metadata.items():
        if any(mark in key for mark in MEGATRON_BUCKETS):
            raise WiscaError(f"{where}: {key}: Megatron's dp_reshardable optimizer buckets cannot be mapped "
                             f"to parameters; save with --dist-ckpt-optim-fully-reshardable")
        if isinstance(meta, TensorStorageMetadata):
            chunk_at = {tuple(c.offsets): tuple(c.sizes) for c in meta.chunks}
            indices = sorted(by_fqn.get(key, []), key=lambda i: tuple(i.offset or ()))
            for idx in indices:
                at = tuple(idx.offset or ())
                if at not in chunk_at:
                    raise WiscaError(f"{where}: {key}: stored chunk at {list(at)} is not in the metadata")
                folder.chunk_sizes[idx] = chunk_at[at]
            if len(indices) != len(meta.chunks):
                raise WiscaError(f"{where}: {key}: {len(meta.chunks)} chunks in the metadata, "
                                 f"{len(indices)} stored")
            folder.entries[key] = Entry(key, folder, indices, meta.properties.dtype, tuple(meta.size))
        elif isinstance(meta, BytesStorageMetadata):
            folder.entries[key] = Entry(key, folder, by_fqn.get(key, []))
        else:
            raise WiscaError(f"{where}: {key} has storage type {type(meta).__name__}, which wisca does not know")
    return folder


def stack_layers(folder, prefix: str, layers: int, config_path: Path) -> None:
    """Replace each stacked tensor of ``folder`` (an entry whose name holds ``prefix`` at a
    segment boundary, not followed by a layer number) by one ``LayerView`` per layer.
    Refuses a stacked tensor whose layer axis disagrees with the config, and chunks that
    span several layers."""
    where = folder.path / METADATA
    for key, e in list(folder.entries.items()):
        at = key.find(prefix)
        if at < 0 or (at > 0 and key[at - 1] != "."):
            continue
        head, tail = key[:at], key[at + len(prefix):]
        if tail.split(".", 1)[0].isdigit():
            continue                         # a layer's own tensor, not stacked
        if not e.is_tensor:
            continue                         # per-layer objects (_extra_state/shard_*): copied as they are
        if not e.size or e.size[0] != layers:
            raise WiscaError(f"{where}: {key}: a Megatron-core tensor of {e.size[0] if e.size else 0} stacked layers, "
                             f"but {config_path} says num_hidden_layers={layers}; is it this model's config?")
        by_layer: dict[int, list] = {}
        for idx in e.indices:
            if e.folder.chunk_sizes[idx][0] != 1:
                raise WiscaError(f"{where}: {key}: a chunk spans {e.folder.chunk_sizes[idx][0]} layers; "
                                 f"wisca reads Megatron-core's stacked tensors a layer per chunk")
            by_layer.setdefault(idx.offset[0], []).append(idx)
        del folder.entries[key]
        for layer in range(layers):
            name = f"{head}{prefix}{layer}.{tail}"
            folder.entries[name] = LayerView(name, folder, by_layer.get(layer, []), e.dtype, tuple(e.size[1:]),
                                             base=e, layer=layer)


def read_full(entry: Entry) -> torch.Tensor:
    """A whole tensor from its chunks."""
    return _assemble(entry, [entry.folder.read_raw(idx) for idx in entry.indices])


def _canonical(fqn: str) -> str:
    """An FQN without wrapper segments (torch.compile, FSDP1, activation checkpointing, DDP)."""
    parts = [p for p in fqn.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _match(fqn: str, known: dict[str, str]) -> str | None:
    """The spec name of the known name an FQN ends with, at a segment boundary (wrapper
    prefixes dropped)."""
    parts = _canonical(fqn).split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:])
        if name in known:
            return known[name]
    return None


@dataclass
class DcpCheckpoint:
    root: Path
    config: dict
    layout: Layout
    folders: list[Folder]
    weights: dict[str, Entry]                   # spec name -> entry
    moments: dict[str, dict[str, Entry]]        # spec name -> state key -> entry
    adapter: str | None
    config_path: Path
    source: str = ""
    untouched: list = field(default_factory=list)   # (state key, entry) of parameters wisca never scales
    # layer -> [(fused description, state key, entry)]: moments of a parameter fused in memory
    # whose weights the checkpoint holds split (torchtitan's wqkv)
    fused_moments: dict = field(default_factory=dict)
    beside: tuple = ()       # hidden files of the saved step its framework keeps (copied as they are)
    dropped: list = field(default_factory=list)     # optimizer entries left out (training_state "drop")
    powers: dict = field(default_factory=lambda: dict(MOMENT_POWERS))   # state key -> p (entry / S**p)
    skip: set = field(default_factory=set)          # folders beside the checkpoint's not to copy

    @property
    def tensors(self) -> dict:   # what api's helpers read: shapes by spec name
        return {n: _Shape(e.size) for n, e in self.weights.items()}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for f in self.folders for e in f.entries.values())

    def close(self) -> None:
        for f in self.folders:
            f.close()


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def _find_config(root: Path, given: str | os.PathLike | None) -> Path:
    if given is not None:
        p = Path(given)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            from .options import OptionError
            raise OptionError("config", f"{given}: no config.json there")
        return p
    for p in (root / "config.json", root.parent / "config.json"):
        if p.is_file():
            return p
    raise WiscaError(f"{root}: no config.json in the folder or its parent; pass `config` "
                     f"(a Hugging Face config.json, or the folder holding one)", fields=("config",))


def _stage_list(layout: Layout):
    from .stream import _stages
    return _stages(_Lay(layout))


def _known_names(layout: Layout) -> dict[str, str]:
    """Every name the spec gives a tensor, and its in-memory name (a state dict saved from a
    transformers 5 model), -> the spec's name."""
    names = {n for s in _stage_list(layout) for n in s.names.values()}
    return {**{layout.spec.memory_name(n): n for n in names}, **{n: n for n in names}}


@dataclass(frozen=True)
class _Lay:
    layout: Layout


def open_dcp(src: str | os.PathLike, config: str | os.PathLike | None = None,
             training_state: str = "transform") -> DcpCheckpoint:
    """The checkpoint's folders, its model's layout and every entry accounted for: weights by
    spec name, optimizer state by the weight it follows (``_account_state``: state that
    follows no tensor of the checkpoint is refused). ``training_state`` "drop": the
    optimizer's entries are left out of the output (``DcpCheckpoint.dropped``)."""
    from .checkpoint import _load_json

    root = Path(src)
    dropped_folders, tracked = [], None
    if (root / TRAINER_MODEL / METADATA).is_file():          # HF Trainer / Accelerate FSDP
        folders = [open_folder(root / TRAINER_MODEL, TRAINER_MODEL)]
        if (root / TRAINER_OPTIM / METADATA).is_file():
            if training_state == "drop":
                dropped_folders.append(TRAINER_OPTIM + "/")
            else:
                folders.append(open_folder(root / TRAINER_OPTIM, TRAINER_OPTIM))
    else:
        sub = next((d for d in _dcp_folders()[1:] if (root / d / METADATA).is_file()), None)
        tracked = None if sub else megatron.iteration_folder(root)   # Megatron-LM's iter_N/ beside its tracker
        sub = sub or tracked
        folders = [open_folder(root / sub, sub)] if sub else [open_folder(root, "")]
    cfg_path = _find_config(root, config)
    cfg = _load_json(cfg_path, "config.json")
    from .framework import shipped_frameworks

    stacked = None            # a framework storing layers stacked (Megatron-core)
    if megatron.is_megatron(folders[0].path):
        megatron.check_backend(folders[0].path)
        stacked = shipped_frameworks()["megatron"]
    keys = [k for f in folders for k, e in f.entries.items() if e.is_tensor and not _optimizer_key(k)]
    # the tensor names say how MoE experts are stored: per expert, or fused in 3-D tensors
    base = layout_from_config(cfg, str(cfg_path), tensor_names=[_canonical(k) for k in keys])
    if stacked is not None:
        if base.spec.name not in stacked.families:
            raise megatron.unsupported_family(root, base.spec.name, stacked.families)
        for f in folders:
            stack_layers(f, stacked.stacked_prefix(base.spec.name), base.layers, cfg_path)
        keys = [k for f in folders for k, e in f.entries.items() if e.is_tensor and not _optimizer_key(k)]
    # the family's own (Hugging Face) names, or a framework's (frameworks/*.json)
    names = [_canonical(k) for k in keys]
    candidates = [(None, base, None)] + [
        (fw.name, layout_from_config(cfg, str(cfg_path), tensor_names=names,
                                     spec=base.spec.adapted(fw.name, fw.families[base.spec.name])), fw)
        for fw in shipped_frameworks().values() if base.spec.name in fw.families]
    if stacked is not None:
        candidates = [c for c in candidates if c[2] is stacked]
    for adapter, layout, framework in candidates:
        known = _known_names(layout)
        if any(_match(k, known) == layout.spec.embed for k in keys):
            break
    else:
        if stacked is not None:
            raise WiscaError(f"{root}: a Megatron-core checkpoint without {layout.spec.embed}; its tensors are "
                             f"named like {keys[0] if keys else '(none)'!r}")
        raise WiscaError(_unrecognised(root, base, cfg_path, keys, [c[0] for c in candidates[1:]]))
    first = framework is not None and framework.state_key == "first"
    powers = {**MOMENT_POWERS, **(dict(framework.state_powers) if framework is not None else {})}
    weights = {}
    for f in folders:
        for key, e in f.entries.items():
            if e.is_tensor and not _optimizer_key(key) and not _state_like(key):
                name = _match(key, known)
                if name is not None:
                    if name in weights:
                        raise WiscaError(f"{f.path / METADATA}: {weights[name].key} and {key} both name {name}")
                    weights[name] = e
    dropped = dropped_folders + (_drop_state(folders) if training_state == "drop" else [])
    fused = {}      # a fused parameter's name in each layer -> (layer, its description)
    if framework is not None:
        for i in range(layout.layers):
            for f in framework.families[base.spec.name].fused_state.values():
                fused[layout.spec.layer_name(i, f.name)] = (i, f)
    moments, untouched, fused_moments = _account_state(folders, known, keys, fused, first, powers)
    ckpt = DcpCheckpoint(root, cfg, layout, folders, weights, moments, adapter, cfg_path, str(root),
                         untouched=untouched, dropped=dropped, fused_moments=fused_moments,
                         beside=framework.beside if framework is not None else (), powers=powers)
    if tracked:   # only the tracker's iteration goes out, not the older ones beside it
        ckpt.skip = {p.name for p in root.iterdir() if p.is_dir() and p.name != tracked
                     and (p.name.startswith("iter_") or p.name == "release")}
    if layout.mxfp4_experts or layout.fp8_weights:
        kind = "MXFP4-quantised experts" if layout.mxfp4_experts else "FP8 block-quantised weights"
        raise WiscaError(f"{root}: {kind} in a torch.distributed checkpoint are not supported "
                         f"(they are read from safetensors folders)")
    for i in range(layout.layers):
        for role, name in layout.layer_roles(i).items():
            if name not in weights:
                raise WiscaError(f"{root}: tensor {name} (layer {i} {role}) not in the checkpoint")
    for name, shape in extra_shapes(layout).items():   # per-layer input embeddings, a hyper head
        if name not in weights:
            raise WiscaError(f"{root}: tensor {name} not in the checkpoint")
        if tuple(weights[name].size) != shape:
            raise WiscaError(f"{root}: tensor {name} has shape {list(weights[name].size)}, expected {list(shape)} "
                             f"from config.json")
    return ckpt


def _optimizer_key(key: str) -> bool:
    """Under the optimizer's top-level key of torch or a framework (``frameworks/*.json``):
    ``<prefix>state.<parameter fqn>.<state key>``, ``<prefix>param_groups....``."""
    from .framework import optimizer_prefixes

    return key.startswith(optimizer_prefixes())


def _state_like(key: str) -> bool:
    """Named like a moment or a master copy (outside an optimizer's keys: refused)."""
    return key.rsplit(".", 1)[-1] in STATE_LIKE or any(m in key.lower() for m in MASTER_LIKE)


def _state_key(key: str, first: bool = False) -> tuple[str, str] | None:
    """(parameter fqn, state key) of an optimizer state entry, else None; ``first``: the
    state key stands before the parameter (Megatron-core's ``state.exp_avg.<param>``)."""
    from .framework import optimizer_prefixes

    for prefix in optimizer_prefixes():
        if key.startswith(prefix + "state."):
            rest = key[len(prefix) + len("state."):]
            if first:
                moment, _, fqn = rest.partition(".")
            else:
                fqn, _, moment = rest.rpartition(".")
            return fqn, moment
    return None


def _unrecognised(root: Path, base: Layout, cfg_path: Path, keys: list[str], frameworks: list[str]) -> str:
    """One line: what the checkpoint looks like, and what to pass."""
    from .framework import shipped_frameworks

    embeds = [base.spec.embed] + [fw.families[base.spec.name].embed for fw in shipped_frameworks().values()
                                  if base.spec.name in fw.families]
    sample = next((k for k in keys if ".0." in k), keys[0] if keys else "(none)")
    known = f" or {', '.join(frameworks)}'s" if frameworks else ""
    return (f"{root}: no tensor named like the {base.spec.name} embedding in Hugging Face's{known} names "
            f"({' or '.join(embeds)}); its tensors are named like {sample!r}: a framework wisca has no "
            f"description of (frameworks/*.json), or is {cfg_path} not this model's config?")


def _account_state(folders: list[Folder], known: dict[str, str], model_keys: list[str], fused: dict,
                   first: bool = False, powers: dict | None = None):
    """Every entry that is or looks like training state, accounted for: (moments by spec
    name -> state key -> entry, [(state key, entry)] of model tensors outside the spec, which
    wisca never scales). Refuses (``WiscaError`` naming the entry) state that follows no
    tensor of the checkpoint, a pickled (non-tensor) moment, and a moment or master copy
    outside an optimizer's keys: wisca could not say it was rescaled."""
    suffixes = set()
    for k in model_keys:
        parts = _canonical(k).split(".")
        suffixes |= {".".join(parts[i:]) for i in range(len(parts))}
    moments, untouched, fused_moments = {}, [], {}
    fused_names = {n: n for n in fused}
    for f in folders:
        for key, e in f.entries.items():
            where = f.path / METADATA
            parsed = _state_key(key, first)
            if parsed is None:
                if e.is_tensor and _optimizer_key(key) and ".param_groups." not in key:
                    raise WiscaError(f"{where}: {key}: optimizer state wisca cannot map to a parameter (not "
                                     f"<prefix>state.<parameter>.<key>); nothing written")
                if not _optimizer_key(key) and _state_like(key):
                    raise WiscaError(f"{where}: {key}: looks like training state (a moment or a master copy) "
                                     f"outside the optimizer's keys; wisca cannot tell which weight it follows, "
                                     f"so it cannot rescale it; nothing written")
                continue
            fqn, moment = parsed
            if not e.is_tensor:
                if (powers or MOMENT_POWERS).get(moment) == 0:
                    continue                       # a step count stored as an object
                raise WiscaError(f"{where}: {key}: optimizer state stored as a pickled object, not a tensor; "
                                 f"wisca cannot rescale it; nothing written")
            name = _match(fqn, known)
            if name is not None:
                moments.setdefault(name, {})[moment] = e
            elif (fused_name := _match(fqn, fused_names)) is not None:
                layer, description = fused[fused_name]
                fused_moments.setdefault(layer, []).append((description, moment, e))
            elif _canonical(fqn) in suffixes:
                untouched.append((moment, e))
            else:
                raise WiscaError(f"{where}: {key}: optimizer state of {fqn}, which is not a tensor of the "
                                 f"checkpoint; wisca cannot tell which weight it follows (a fused parameter?), "
                                 f"so it cannot rescale it; nothing written")
    return moments, untouched, fused_moments


def _drop_state(folders: list[Folder]) -> list[str]:
    """Leave every optimizer entry out of the output (``training_state`` "drop")."""
    dropped = []
    for f in folders:
        for key in [k for k in f.entries if _optimizer_key(k)]:
            del f.entries[key]
            dropped.append(key)
    return dropped


# -- the world: one process, or the ranks of a torchrun job -------------------------------------
class World:
    """Rank and size, and the few collectives the backend needs (no-ops for one process)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.size = self.dist.get_world_size() if self.dist else 1

    def gather(self, obj) -> list:
        if self.dist is None:
            return [obj]
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src)
        return box[0]

    def send(self, obj, dst: int) -> None:
        self.dist.send_object_list([obj], dst)

    def recv(self, src: int):
        box = [None]
        self.dist.recv_object_list(box, src)
        return box[0]


class PeerFailed(WiscaError):
    """Another rank failed; its error is the one reported."""


def blocks(layers: int, size: int) -> list[range]:
    """Contiguous blocks of decoder layers, one per rank."""
    return [range(r * layers // size, (r + 1) * layers // size) for r in range(size)]


# -- writing ----------------------------------------------------------------------------------
class Ring:
    """Memory for chunks on their way from the source to the output: one mapping, handed
    out in order and handed back as the writer thread finishes with it, so its pages stay
    hot (writing into fresh memory cost several times the copy itself here) and the RSS
    stays flat. A chunk that does not fit, or that would land on memory not yet handed to
    the writer, gets fresh memory instead."""

    def __init__(self, size: int = 256 << 20):
        self.size, self.head, self.mem = size, 0, None
        self.live: deque[list] = deque()       # [start, end, future or None], oldest first

    def take(self, n: int) -> tuple[memoryview, list | None]:
        """(writable memory of ``n`` bytes, its slot: hand it to ``ChunkWriter.put_region``
        or ``release``)."""
        if n == 0 or 2 * n > self.size:
            return memoryview(bytearray(n)), None
        start = self.head if self.head + n <= self.size else 0
        while any(lo < start + n and start < hi for lo, hi, _ in self.live):
            if self.live[0][2] is None:        # still in use before the writer has it
                return memoryview(bytearray(n)), None
            self.live.popleft()[2].result()
        if self.mem is None:
            self.mem = memoryview(mmap.mmap(-1, self.size))
        slot = [start, start + n, None]
        self.live.append(slot)
        self.head = start + n
        return self.mem[start:start + n], slot

    @staticmethod
    def release(slot: list | None) -> None:
        if slot is not None:
            slot[2] = _DONE

    def drain(self) -> None:
        while self.live:
            f = self.live.popleft()[2]
            if f is not None:
                f.result()


# threads writing chunks: a write() into the page cache costs about a core per 450 MB/s here
# (the kernel's copy), so one thread cannot keep up with the disk; positioned writes let two
# share a file
WRITERS = 1


class ChunkWriter:
    """One output ``.distcp`` file: chunks appended, each one's place fixed when it is handed
    over and its bytes written by ``pool`` (one writer thread), so reading and computing go
    on while the disk writes; at most ``BACKLOG`` bytes wait. The file is written with
    ``O_DIRECT`` (``fileio.OutputFile``): a buffered write costs a core per 450-560 MB/s here
    (the kernel's copy into fresh page-cache pages), a direct one next to nothing. Untouched
    chunks are read on the writer thread, a piece at a time, and written the same way."""

    BACKLOG = 512 << 20
    PIECE = 16 << 20         # bytes per read of an untouched chunk
    AHEAD = 3                # pieces read ahead of the one being written

    def __init__(self, folder: Path, name: str, pool):
        from .fileio import OutputFile

        self.name, self.path, self.pool = name, folder / name, pool
        self.out = OutputFile(self.path, None, gaps=True)
        self.fd = self.out.fd
        self.pos, self.infos, self.pending = 0, {}, deque()
        self._pieces: list[memoryview] = []       # for untouched chunks: AHEAD read, one written
        self._reader: ThreadPoolExecutor | None = None

    def _place(self, idx, n: int, memory=None) -> int:
        """The chunk's offset in the file: the next byte, or (``memory``: where its bytes are)
        up to a page further, so that the file offset and the memory address agree modulo a
        page and the disk reads the chunk straight from that memory (``O_DIRECT``); the
        skipped bytes are never read (the storage table gives each chunk's offset)."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        from .fileio import PAGE, _address

        at = self.pos
        if memory is not None and n >= PAGE:
            at += (_address(memoryview(memory).cast("B")) - at) % PAGE
        self.pos = at + n
        self.infos[idx] = _StorageInfo(self.name, at, n)
        return at

    def _submit(self, n: int, fn, *args) -> Future:
        future = self.pool.submit(fn, *args)
        self.pending.append((n, future))
        while sum(k for k, _ in self.pending) > self.BACKLOG:
            self.pending.popleft()[1].result()
        return future

    def put_raw(self, idx, raw) -> None:
        at = self._place(idx, len(raw), raw)
        self._submit(len(raw), self.out.write, at, raw)

    def put_region(self, idx, buf, slot: list | None, record: chunkbytes.Record | None = None) -> None:
        """A chunk's archive in ring memory; ``record``: its tensor bytes changed, so the
        CRCs are recomputed (on the writer thread) first."""
        at = self._place(idx, len(buf), buf)

        def write():
            if record is not None:
                chunkbytes.seal(buf, record)
            self.out.write(at, buf)

        future = self._submit(len(buf), write)
        if slot is not None:
            slot[2] = future

    def put_copy(self, idx, src_fd: int, offset: int, n: int) -> None:
        """A chunk's bytes as they are in the source file."""
        from .fileio import _aligned_block

        if not self._pieces:
            self._pieces = [_aligned_block(self.PIECE) for _ in range(self.AHEAD + 1)]
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="wisca-dcp-read")
        at = self._place(idx, n, self._pieces[0])
        self._submit(0, self._copy, src_fd, offset, at, n)

    def _copy(self, src_fd: int, offset: int, at: int, n: int) -> None:
        """On the writer thread: piece k written while the reader thread reads the next ones."""
        def read(view: memoryview, start: int) -> None:
            got = 0
            while got < len(view):
                m = os.preadv(src_fd, [view[got:]], offset + start + got)
                if m == 0:
                    raise WiscaError(f"{self.path}: the source ended while copying a chunk (truncated checkpoint)")
                got += m

        starts = list(range(0, n, self.PIECE))
        views = [self._pieces[j % len(self._pieces)][:min(self.PIECE, n - start)] for j, start in enumerate(starts)]
        ahead = deque(self._reader.submit(read, views[j], starts[j]) for j in range(min(len(starts), self.AHEAD)))
        for j, start in enumerate(starts):
            ahead.popleft().result()
            self.out.write(at + start, views[j])
            if j + self.AHEAD < len(starts):
                ahead.append(self._reader.submit(read, views[j + self.AHEAD], starts[j + self.AHEAD]))

    def put_tensor(self, idx, t: torch.Tensor, fresh: bool = False) -> None:
        """``fresh``: t owns its storage exactly (else a clone: torch.save writes the whole
        storage a view lives in)."""
        buf = io.BytesIO()
        torch.save(t.detach() if fresh and t.is_contiguous() else t.detach().clone().contiguous(), buf)
        self.put_raw(idx, buf.getbuffer())

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft()[1].result()

    def close(self) -> None:
        if self.fd is not None:
            self.drain()
            self.out.close()           # the last partial page, the length, fsync
            self.fd = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)

    def abort(self) -> None:
        if self.fd is not None:
            for _, f in self.pending:
                f.cancel()
            for _, f in self.pending:
                if not f.cancelled():
                    f.exception()
            self.pending.clear()
            self.out.abort()
            self.fd = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)


def _will_need(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def write_metadata(folder: Folder, out: Path, storage: dict) -> None:
    """The source's metadata with the new storage table: same keys, chunks, planner data."""
    from .unpickle import dump

    md = copy.copy(folder.metadata)
    kept = {e.stored for e in folder.entries.values()}   # a stacked tensor once, not per layer view
    # each piece's storage info in the source's class (a framework's own, e.g. OLMo-core's)
    md.storage_data = {idx: _same_class(folder.storage[idx], storage[idx]) for idx in folder.storage
                       if idx.fqn in kept}
    if len(kept) != len(md.state_dict_metadata):   # entries left out (training_state "drop")
        md.state_dict_metadata = {k: v for k, v in md.state_dict_metadata.items() if k in kept}
        if isinstance(md.planner_data, dict):
            md.planner_data = {k: v for k, v in md.planner_data.items() if k in kept}
    with open(out / METADATA, "wb") as f:
        dump(md, f)
        f.flush()
        os.fsync(f.fileno())


def _same_class(source_info, info):
    if type(info) is type(source_info):
        return info
    return type(source_info)(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)})


# LayerFn: (layer, tensors by role) -> (new tensors by role, multipliers by role (W' = S * W),
# layer report); it may change ``tensors`` in place (the reference forward has run by then)
LayerFn = Callable[[int, dict], tuple[dict, dict]]


def rewrite(ckpt: DcpCheckpoint, out_root: Path, layer_fn: LayerFn, verifier, progress=None,
            world: World | None = None, final_fn: Callable | None = None) -> dict:
    """This rank's part of the output: its block of layers (the embedding on rank 0, the
    final norm and head on the last rank), their moments, and its share of every other
    entry. ``final_fn(small tensors, head_blocks, head dtype) -> (new tensors, report, role ->
    multiplier)``: the final norm -> lm_head pair (the norm target). Returns this rank's
    payload: storage tables, layer reports, verification."""
    world = world or World()
    rank, size, lay = world.rank, world.size, ckpt.layout
    mine = blocks(lay.layers, size)[rank]
    stage_names = {s.kind: s.names for s in _stage_list(lay) if s.kind != "layer"}
    writers = {}
    pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="wisca-dcp-write")
    ring = Ring()
    for f in ckpt.folders:
        (out_root / f.rel).mkdir(parents=True, exist_ok=True)
        writers[f.rel] = ChunkWriter(out_root / f.rel, f"__{rank}_0.distcp", pool)
    done: set[str] = set()       # entry keys handled by their stage
    accounting: dict[str, dict[str, int]] = {}   # state key -> scaled / untouched / copied
    reports, fault = [], os.environ.get("WISCA_TEST_FAULT_RANK")
    state = {"result": None}

    def check_fault() -> None:
        if fault is not None and int(fault) == rank:
            raise WiscaError(f"injected test fault on rank {rank} (WISCA_TEST_FAULT_RANK)")

    def copy_entry(e: Entry, use: Callable | None = None) -> None:
        """Byte for byte; ``use(offsets, chunk)`` sees each chunk as a tensor on the way."""
        for idx, offsets, _ in e.pieces():
            if use is None or not e.is_tensor:
                writers[e.folder.rel].put_copy(idx, *e.folder.source(idx))
                continue
            raw = e.folder.read_raw(idx)
            writers[e.folder.rel].put_raw(idx, raw)
            use(offsets, e.load(idx, raw))
        done.add(e.key)
        check_fault()

    def read_chunk(e: Entry, idx) -> tuple:
        """(its bytes in ring memory, their slot, the tensor record or None)."""
        buf, slot = ring.take(e.folder.storage[idx].length)
        e.folder.read_into(idx, buf)
        return buf, slot, chunkbytes.locate(buf, e.dtype, e.folder.chunk_sizes[idx])   # the shape as stored

    def chunk_tensor(e: Entry, idx, chunk: tuple) -> torch.Tensor:
        buf, _, rec = chunk
        if rec is None:
            return e.load(idx, bytes(buf))
        return chunkbytes.view(buf, rec, e.dtype, e.chunk_size(idx))

    def put_chunk(e: Entry, idx, chunk: tuple, new: torch.Tensor | None = None) -> None:
        """A chunk read by ``read_chunk``, as it was or (``new``) with these values."""
        buf, slot, rec = chunk
        if new is None:
            writers[e.folder.rel].put_region(idx, buf, slot)
        elif rec is None:
            ring.release(slot)
            writers[e.folder.rel].put_tensor(idx, new.reshape(e.folder.chunk_sizes[idx]))   # as stored
        else:
            view = chunkbytes.view(buf, rec, e.dtype, e.chunk_size(idx))
            if view.data_ptr() != new.data_ptr():
                view.copy_(new)
            writers[e.folder.rel].put_region(idx, buf, slot, rec)

    def scale_entry(e: Entry, mult, power: int) -> None:
        for idx, offsets, sizes in e.pieces():
            m = chunk_multiplier(mult, offsets, sizes)
            if bool((m == 1).all()):   # a chunk whose units all keep s = 1: its bytes as they are
                writers[e.folder.rel].put_copy(idx, *e.folder.source(idx))
                continue
            chunk = read_chunk(e, idx)
            put_chunk(e, idx, chunk, apply_multiplier_(chunk_tensor(e, idx, chunk), m, power))
        done.add(e.key)
        check_fault()

    def count(moment: str, how: str) -> None:
        accounting.setdefault(moment, {"scaled": 0, "untouched": 0, "copied": 0})[how] += 1

    def state_entry(moment: str, e: Entry, mult) -> None:
        """One optimizer state entry of a parameter whose multiplier is ``mult`` (None: 1):
        copied (a key no rescaling changes, or S = 1) or divided by S**p, and counted."""
        if ckpt.powers.get(moment) == 0:
            copy_entry(e)
            count(moment, "copied")
        elif mult is None or bool((mult == 1).all()):
            copy_entry(e)
            count(moment, "untouched")
        elif moment not in ckpt.powers:
            raise WiscaError(f"{e.folder.path / METADATA}: {e.key}: optimizer state {moment!r} of a "
                             f"rescaled parameter; wisca knows {', '.join(ckpt.powers)}")
        else:
            scale_entry(e, mult, -ckpt.powers[moment])
            count(moment, "scaled")

    def moments_of(name: str, mult) -> None:
        for moment, e in sorted(ckpt.moments.get(name, {}).items()):
            state_entry(moment, e, mult)

    def fused_moments_of(i: int, mults: dict, shapes: dict) -> None:
        """Moments of a parameter fused in memory, its weights split here: divided by the
        multiplier assembled from its parts' (``framework.fused_multiplier``)."""
        from .framework import fused_multiplier

        assembled = {}   # one multiplier per fused parameter, for all its moments
        for fused, moment, e in ckpt.fused_moments.get(i, []):
            if ckpt.powers.get(moment) == 0:
                state_entry(moment, e, None)
                continue
            want = (sum(shapes[p][0] for p in fused.parts), *shapes[fused.parts[0]][1:])
            if tuple(e.size) != want:
                raise WiscaError(f"{e.folder.path / METADATA}: {e.key}: shape {list(e.size)}, but its parts "
                                 f"{', '.join(fused.parts)} make {list(want)}")
            if fused.name not in assembled:
                assembled[fused.name] = fused_multiplier(fused, {role: mults.get(role) for role in fused.parts},
                                                         shapes, lay.kv_heads, lay.head_dim)
            state_entry(moment, e, assembled[fused.name])

    def chained(step):
        """Run ``step`` with the verifier's streams handed over from the previous rank."""
        relay = verifier is not None and size > 1
        if relay and rank > 0:
            got = world.recv(rank - 1)
            if got.get("failed"):
                raise PeerFailed("another rank failed")
            verifier.set_state(got)
        try:
            step()
        except BaseException:
            if relay and rank < size - 1:
                world.send({"failed": True}, rank + 1)
            raise
        if relay and rank < size - 1:
            world.send(verifier.get_state(), rank + 1)

    def rows(e: Entry, feed: Callable) -> None:
        """``feed(first_row, rows)`` over a big 2-D tensor, a chunk at a time when its chunks
        are row blocks (FSDP's dim-0 shards), else whole; copied out on the way."""
        if _row_blocks(e):
            copy_entry(e, lambda offsets, t: feed(offsets[0], t))
        else:
            feed(0, read_full(e))
            copy_entry(e)

    def embed_stage():
        names = stage_names["embed"]
        e = ckpt.weights[names["embed"]]
        extra = {}
        for role, name in names.items():
            if role == "ple_embed" and verifier is not None:   # Gemma 4's per-layer embedding: rows
                pe = ckpt.weights[name]
                rows(pe, lambda start, t: (_require_finite(pe, t), verifier.ple_rows(start, t, t)))
            elif role != "embed":
                extra[role] = read_full(ckpt.weights[name]) if verifier is not None else None
                copy_entry(ckpt.weights[name])
            moments_of(name, None)
        if verifier is None:
            copy_entry(e)
        else:
            rows(e, lambda start, t: (_require_finite(e, t), verifier.embed_rows(start, t, t)))
            verifier.embed_done(extra, extra)
        if progress:
            progress(sum(ckpt.weights[n].nbytes for n in names.values()), "embed")

    def layer_stage(i: int):
        roles = lay.layer_roles(i)
        entries = {role: ckpt.weights[name] for role, name in roles.items()}
        chunks = {role: [read_chunk(e, idx) for idx in e.indices] for role, e in entries.items()}
        tensors = {role: _assemble(e, [chunk_tensor(e, idx, c) for idx, c in zip(e.indices, chunks[role])])
                   for role, e in entries.items()}
        for role, t in tensors.items():
            _require_finite(entries[role], t)
        ref = verifier.start_layer(tensors) if verifier is not None else None   # the originals, now
        new, mults, report = layer_fn(i, tensors)
        tensors.update(new)
        if verifier is not None:
            verifier.finish_layer(i, ref, tensors)
        for role, e in entries.items():
            for j, (idx, offsets, sizes) in enumerate(e.pieces()):
                if role in mults and not bool((chunk_multiplier(mults[role], offsets, sizes) == 1).all()):
                    put_chunk(e, idx, chunks[role][j], tensors[role][_slices(offsets, sizes)])
                else:   # untouched (or every unit of this chunk kept s = 1)
                    put_chunk(e, idx, chunks[role][j])
            done.add(e.key)
            check_fault()
            moments_of(roles[role], mults.get(role))
        fused_moments_of(i, mults, {role: tuple(e.size) for role, e in entries.items()})
        reports.append({"layer": i, **report})
        if progress:
            progress(sum(e.nbytes for e in entries.values()), f"layer {i}")

    def final_stage():
        names = stage_names["final"]
        head = ckpt.weights[names["head"]]
        write_head = not lay.tie_embeddings      # a tied head was written as the embedding
        small = {role: read_full(ckpt.weights[n]) for role, n in names.items() if role != "head"}
        for role, t in small.items():
            _require_finite(ckpt.weights[names[role]], t)
        ordered = sorted(head.pieces(), key=lambda p: p[1])
        by_rows = _row_blocks(head)

        def head_blocks():
            if by_rows:
                return ((offsets[0], head.load(idx)) for idx, offsets, _ in ordered)
            return iter([(0, read_full(head))])

        new, mults = {}, {}
        if final_fn is not None and write_head:   # the norm target's final norm -> lm_head
            new, report, mults = final_fn(small, head_blocks, head.dtype)
            if report:
                reports.append({"layer": "final", **report})
        for role, t in small.items():
            e = ckpt.weights[names[role]]
            if role in new:
                for idx, offsets, sizes in e.pieces():
                    writers[e.folder.rel].put_tensor(idx, new[role][_slices(offsets, sizes)].reshape(e.folder.chunk_sizes[idx]))
                done.add(e.key)
            else:
                copy_entry(e)
            moments_of(names[role], mults.get(role))
        if verifier is not None:
            after = {**small, **new}
            verifier.final_norm(small["norm"], after["norm"], small, after)
        def feed(start: int, block: torch.Tensor, out: torch.Tensor | None = None) -> None:
            _require_finite(head, block)
            verifier.head_rows(block, block if out is None else out, start)

        if "head" in mults:        # the final norm pair: lm_head's columns rescaled, chunk by chunk
            for start, block in head_blocks():
                offsets = (start,) + (0,) * (block.dim() - 1)
                out = apply_multiplier(block, chunk_multiplier(mults["head"], offsets, tuple(block.shape)), 1)
                if verifier is not None:
                    feed(start, block, out)
                _put_rows(head, start, out)
        elif write_head and verifier is not None:   # untouched: its bytes as they are, read once
            rows(head, feed)
        elif write_head:
            copy_entry(head)
        elif verifier is not None:  # tied: the embedding, written with the embed stage
            for start, block in head_blocks():
                feed(start, block)
        if verifier is not None:
            state["result"] = verifier.result()
        if write_head:
            done.add(head.key)
            moments_of(names["head"], mults.get("head"))
        if progress:
            progress(sum(ckpt.weights[n].nbytes for n in names.values()), "final")

    def _put_rows(e: Entry, start: int, rows: torch.Tensor) -> None:
        """Write the chunks of ``e`` that a block of rows (starting at ``start``) holds."""
        for idx, offsets, sizes in e.pieces():
            lo = offsets[0] - start if offsets else 0
            if 0 <= lo and lo + (sizes[0] if sizes else 1) <= rows.shape[0]:
                box = (slice(lo, lo + sizes[0]), *(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:])))
                writers[e.folder.rel].put_tensor(idx, rows[box])

    def prefetch(i: int) -> None:
        """Ask the kernel to read stage ``i``'s chunks (weights and moments) while this one
        computes: a layer of this rank's, or the embedding (-1) and the final stage (layers)."""
        if i in mine:
            names = lay.layer_roles(i).values()
        elif (i == -1 and rank == 0) or (i == lay.layers and rank == size - 1):
            names = stage_names["embed" if i == -1 else "final"].values()
        else:
            return
        for name in names:
            for e in [ckpt.weights[name], *ckpt.moments.get(name, {}).values()]:
                for idx in e.indices:
                    _will_need(*e.folder.source(idx))

    def work():
        prefetch(-1)
        prefetch(mine.start if len(mine) else lay.layers)
        if rank == 0:
            embed_stage()
        for i in mine:
            prefetch(i + 1 if i + 1 < mine.stop else lay.layers)
            layer_stage(i)
        if rank == size - 1:
            final_stage()

    try:
        chained(work)
        # every other entry (tensors outside the spec, bytes, other state), shared out by rank
        claimed = {e.key for e in ckpt.weights.values()} | {e.key for m in ckpt.moments.values()
                                                            for e in m.values()} | {
            e.key for fm in ckpt.fused_moments.values() for _, _, e in fm}
        rest = [e for f in ckpt.folders for k, e in sorted(f.entries.items()) if k not in claimed]
        outside = {e.key: moment for moment, e in ckpt.untouched}
        for j, e in enumerate(rest):
            if j % size == rank:
                copy_entry(e)
                if e.key in outside:   # state of a tensor outside the spec: never scaled
                    count(outside[e.key], "copied" if ckpt.powers.get(outside[e.key]) == 0 else "untouched")
        for w in writers.values():
            w.close()
    finally:
        for w in writers.values():
            w.abort()
        pool.shutdown(wait=True)
        ring.live.clear()
    return {"storage": {rel: w.infos for rel, w in writers.items()}, "layers": reports,
            "result": state["result"], "accounting": accounting}


def _row_blocks(e: Entry) -> bool:
    """Every chunk spans whole rows (FSDP's dim-0 shards): the tensor can go a chunk at a time."""
    return all(offsets[1:] == (0,) * (len(e.size) - 1) and tuple(sizes[1:]) == e.size[1:]
               for _, offsets, sizes in e.pieces())


def _slices(offsets, sizes) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


def _assemble(e: Entry, raws: list[bytes]) -> torch.Tensor:
    """A whole tensor from its chunks (their bytes, or the chunks as tensors)."""
    def load(idx, raw):
        return raw if isinstance(raw, torch.Tensor) else e.load(idx, raw)

    if len(e.indices) == 1 and tuple(e.chunk_size(e.indices[0])) == e.size:
        return load(e.indices[0], raws[0])
    out = torch.empty(e.size, dtype=e.dtype)
    covered = 0
    for (idx, offsets, sizes), raw in zip(e.pieces(), raws):
        out[_slices(offsets, sizes)] = load(idx, raw)
        covered += torch.Size(sizes).numel()
    if covered != out.numel():
        raise WiscaError(f"{e.folder.path / METADATA}: {e.key}: chunks do not cover the tensor")
    return out


def _require_finite(e: Entry, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel():
        lo, hi = torch.aminmax(t)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise WiscaError(f"{e.folder.path / METADATA}: tensor {e.key} contains NaN or Inf")
