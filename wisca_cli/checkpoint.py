"""Reading and writing safetensors checkpoints, one tensor at a time.

The safetensors library validates every header (offsets, coverage, dtypes); we then read
each tensor's bytes with one positioned read straight into its buffer, and write output
shards whose layout is fixed up front from the input headers, so a tensor can be written
the moment it is ready, in any order. Nothing here knows about WISCA.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import WiscaError, reason
from .fileio import PAGE, InputFile, OutputFile
from .fp8 import SCALE_SUFFIX as FP8_SCALE
from .spec import CONV_PARTS, INDEX_ROLES, Layout, expected_shapes, extra_shapes, layout_from_config, logical_shapes

from .formats import INDEX_NAME, SINGLE_NAME  # noqa: F401 - one definition, re-exported

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E5M2": 1,
            "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INTEGER_DTYPES = ("I64", "I32")
CHUNK_ELEMENTS = 8 << 20     # elements per block when a big tensor is streamed in rows
_FD_LOCK = threading.Lock()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str           # file name inside the checkpoint folder
    dtype: str           # safetensors dtype string
    shape: tuple[int, ...]
    start: int           # absolute byte offset of the data in the shard file
    nbytes: int
    rel_start: int       # offset inside the data section


@dataclass
class Shard:
    name: str
    path: Path
    metadata: dict[str, str] | None
    tensors: list[TensorInfo]    # in file order
    data_start: int


@dataclass
class Checkpoint:
    root: Path
    config: dict
    layout: Layout
    shards: dict[str, Shard]
    tensors: dict[str, TensorInfo]
    index_file: Path | None
    source: str = ""
    _files: dict[str, InputFile] = field(default_factory=dict, repr=False)

    # -- reading ---------------------------------------------------------------------------
    def _file(self, shard: str) -> InputFile:
        with _FD_LOCK:   # the reader thread and the main thread both read
            if shard not in self._files:
                self._files[shard] = InputFile(self.shards[shard].path)
            return self._files[shard]

    def read_raw(self, name: str, offset: int = 0, nbytes: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's bytes (or nbytes of them from offset) as uint8, by positioned reads,
        into ``out`` (a uint8 buffer, e.g. carved from a slab) or a new buffer. Bytes not in
        the page cache come by direct reads when ``out`` is placed like the file (see
        ``fileio.InputFile``)."""
        info = self.tensors[name]
        nbytes = info.nbytes - offset if nbytes is None else nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out
        path = self.shards[info.shard].path
        try:
            self._file(info.shard).read_into(memoryview(buf.numpy()), info.start + offset)
        except EOFError as e:
            raise WiscaError(f"{path}: file ended while reading {name}") from e
        except OSError as e:
            raise WiscaError(f"{path}: cannot read {name}: {e.strerror}") from e
        return buf

    def advise(self, name: str, nbytes: int | None = None) -> None:
        """Hint that the tensor's bytes (or its first ``nbytes``) are needed soon, so the
        kernel reads them from disk in the background (see ``prefetch``). Not for files read
        direct: the hinted bytes would then be read through the page cache at many times
        the CPU cost."""
        info = self.tensors[name]
        n = info.nbytes if nbytes is None else min(nbytes, info.nbytes)
        file = self._file(info.shard)
        if n and not file.reads_direct:
            try:
                os.posix_fadvise(file.fd, info.start, n, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):   # advisory only
                pass

    def read(self, name: str) -> torch.Tensor:
        return as_tensor(self.tensors[name], self.read_raw(name))

    def chunk_bytes(self, name: str, chunk_elements: int = CHUNK_ELEMENTS) -> int:
        """The largest block ``row_chunks`` reads of this tensor."""
        info = self.tensors[name]
        row_bytes = info.nbytes // max(info.shape[0], 1)
        step = max(1, chunk_elements // max(row_bytes // ITEMSIZE[info.dtype], 1))
        return min(step, max(info.shape[0], 1)) * row_bytes

    def row_chunks(self, name: str, chunk_elements: int = CHUNK_ELEMENTS, align: int | None = None,
                   buffer=None):
        """Yield (first row, raw bytes, rows as a tensor) of a 2-D tensor, a block at a time,
        so a 2 GB embedding never sits in memory whole. ``buffer(nbytes, at)`` supplies a
        block's memory; ``at`` is the block's output file offset when ``align`` gives the
        tensor's (see ``memory.carve``), else None."""
        info = self.tensors[name]
        row_bytes = info.nbytes // max(info.shape[0], 1)
        row_elements = row_bytes // ITEMSIZE[info.dtype]
        step = max(1, chunk_elements // max(row_elements, 1))   # the same blocks for any dtype
        for start in range(0, info.shape[0], step):
            rows = min(step, info.shape[0] - start)
            at = None if align is None else align + start * row_bytes
            out = None if buffer is None else buffer(rows * row_bytes, at)
            raw = self.read_raw(name, start * row_bytes, rows * row_bytes, out)
            yield start, raw, raw.view(DTYPES[info.dtype]).reshape(rows, *info.shape[1:])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def as_tensor(info: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
    if info.dtype not in DTYPES:
        raise WiscaError(f"{info.shard}: tensor {info.name} has dtype {info.dtype}, which wisca cannot compute with")
    return raw.view(DTYPES[info.dtype]).reshape(info.shape)


def to_raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


# -- opening ---------------------------------------------------------------------------------
def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WiscaError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise WiscaError(f"{path}: cannot read {what}: {e}") from e
    except json.JSONDecodeError as e:
        raise WiscaError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(data, dict):
        raise WiscaError(f"{path}: expected a JSON object")
    return data


def read_shard(path: Path, name: str) -> Shard:
    """Header of one shard, validated by the safetensors library."""
    if not path.exists():
        raise WiscaError(f"{path}: shard file not found")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
            order = f.offset_keys()
            specs = []
            for key in order:
                sl = f.get_slice(key)
                specs.append((key, sl.get_dtype(), tuple(int(x) for x in sl.get_shape())))
    except SafetensorError as e:
        raise WiscaError(f"{path}: not a valid safetensors file ({reason(e)})") from e
    except (OSError, ValueError, TypeError) as e:
        raise WiscaError(f"{path}: cannot read safetensors header ({reason(e)})") from e
    size = path.stat().st_size
    infos, offset = [], 0
    for key, dtype, shape in specs:
        if dtype not in ITEMSIZE:
            raise WiscaError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        n = ITEMSIZE[dtype]
        for dim in shape:
            n *= dim
        infos.append((key, dtype, shape, offset, n))
        offset += n
    data_start = size - offset
    tensors = [TensorInfo(k, name, dt, sh, data_start + off, n, off) for k, dt, sh, off, n in infos]
    return Shard(name, path, metadata, tensors, data_start)


def open_checkpoint(src: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a local folder or a hub repo id and validate it against its architecture spec."""
    from .hub import resolve_source

    root, source = resolve_source(str(src), revision)
    config = _load_json(root / "config.json", "config.json")
    layout = layout_from_config(config, str(root / "config.json"))

    index_path = root / INDEX_NAME
    if index_path.exists():
        index = _load_json(index_path, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WiscaError(f"{index_path}: has no weight_map")
        for name, s in weight_map.items():
            if not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".") or not s:
                raise WiscaError(f"{index_path}: invalid shard name {s!r} for tensor {name}")
        shard_names = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).exists():
        index_path, weight_map, shard_names = None, None, [SINGLE_NAME]
    else:
        other = "pytorch_model.bin" if (root / "pytorch_model.bin").exists() else None
        hint = " (pytorch_model.bin is not supported: convert it to safetensors first)" if other else ""
        raise WiscaError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME} found{hint}")

    shards, tensors = {}, {}
    for s in shard_names:
        shard = read_shard(root / s, s)
        shards[s] = shard
        for info in shard.tensors:
            if info.name in tensors:
                raise WiscaError(f"{shard.path}: tensor {info.name} is also in {tensors[info.name].shard}")
            tensors[info.name] = info
    if weight_map is not None:
        for name, s in weight_map.items():
            if name not in tensors:
                raise WiscaError(f"{index_path}: tensor {name} is listed in {s} but {s} does not contain it")
            if tensors[name].shard != s:
                raise WiscaError(f"{index_path}: tensor {name} is listed in {s} but is in {tensors[name].shard}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise WiscaError(f"{root / tensors[extra[0]].shard}: tensor {extra[0]} is not listed in {INDEX_NAME}")
    la = layout.spec.linear_attention
    if layout.spec.moe is not None or layout.fp8_block or la and la.conv_split:   # how they are stored: the names tell
        layout = layout_from_config(config, str(root / "config.json"), tensors)
    ckpt = Checkpoint(root, config, layout, shards, tensors, index_path, source)
    validate(ckpt)
    return ckpt


def _check_tensor(ckpt: Checkpoint, name: str, shape: tuple[int, ...], what: str, mxfp4: bool = False,
                  fp8_kind: str | None = None, integer: bool = False) -> None:
    """``fp8_kind``: "codes" (an FP8 weight, F8_E4M3) or "scales" (its weight_scale_inv, F32);
    ``integer``: an index table."""
    if name not in ckpt.tensors:
        raise WiscaError(f"{ckpt.root}: {what} tensor {name} is missing")
    info = ckpt.tensors[name]
    if len(info.shape) != len(shape) or any(n != want for n, want in zip(info.shape, shape) if want != -1):
        extra = f" (weight_block_size {list(ckpt.layout.fp8_block)})" if fp8_kind == "scales" else ""
        raise WiscaError(f"{ckpt.root / info.shard}: tensor {name} has shape {list(info.shape)}, "
                         f"expected {list(shape)} from config.json{extra}")
    if mxfp4 and info.dtype != "U8":
        raise WiscaError(f"{ckpt.root / info.shard}: tensor {name} has dtype {info.dtype}, expected U8 (MXFP4)")
    wanted = {"codes": "F8_E4M3", "scales": "F32"}.get(fp8_kind)
    if wanted and info.dtype != wanted:
        raise WiscaError(f"{ckpt.root / info.shard}: tensor {name} has dtype {info.dtype}, expected {wanted} "
                         f"(FP8 block-quantised weight{'' if fp8_kind == 'codes' else ' scales'})")
    if integer:   # an index table (DeepSeek-V4's token -> experts), copied
        if info.dtype not in INTEGER_DTYPES:
            raise WiscaError(f"{ckpt.root / info.shard}: tensor {name} has dtype {info.dtype}, expected an integer "
                             f"dtype (an index table)")
        return
    if not mxfp4 and not wanted and info.dtype not in FLOAT_DTYPES:
        hint = " (FP8 weights are read as a decoder layer's X.weight beside its X.weight_scale_inv, as " \
               "released)" if info.dtype == "F8_E4M3" and ckpt.layout.fp8_block else ""
        raise WiscaError(f"{ckpt.root / info.shard}: tensor {name} has dtype {info.dtype}, expected a float dtype{hint}")


def layer_pattern(layout: Layout) -> re.Pattern:
    prefix = re.escape(layout.spec.layer_prefix).replace(re.escape("{layer}"), r"(\d+)")
    return re.compile("^" + prefix)


def validate(ckpt: Checkpoint) -> None:
    """Every tensor the spec expects is there with the shape config.json implies; no strays."""
    lay, spec = ckpt.layout, ckpt.layout.spec
    _check_tensor(ckpt, spec.embed, (lay.vocab, lay.hidden), "embedding")
    _check_tensor(ckpt, spec.final_norm, (lay.hidden,), "final norm")
    if not lay.tie_embeddings:
        _check_tensor(ckpt, spec.lm_head, (lay.vocab, lay.hidden), "lm_head")
    if spec.final.norm_bias:
        _check_tensor(ckpt, spec.final.norm_bias, (lay.hidden,), "final norm")
    if spec.final.head_bias:
        _check_tensor(ckpt, spec.final.head_bias, (lay.vocab,), "lm_head bias")
    if spec.embedding.positions:
        count = lay.value(spec.embedding.positions_count, 0)
        _check_tensor(ckpt, spec.embedding.positions, (int(count), lay.hidden), "position embedding")
    for name, shape in extra_shapes(lay).items():   # per-layer input embeddings, a hyper head
        _check_tensor(ckpt, name, shape, "model")
    pattern = layer_pattern(lay)
    known = set()
    for layer in range(lay.layers):
        roles = lay.layer_roles(layer)
        quantized = {name for role, name in roles.items() if lay.is_mxfp4(role)}
        fp8_kind = {name: "scales" if role.endswith(FP8_SCALE) else "codes"
                    for role, name in roles.items() if name in lay.fp8_weights or role.endswith(FP8_SCALE)}
        tables = {name for role, name in roles.items() if role in INDEX_ROLES}
        for name, shape in expected_shapes(lay, layer).items():
            _check_tensor(ckpt, name, shape, f"layer {layer}", name in quantized, fp8_kind.get(name), name in tables)
            known.add(name)
        if lay.conv_split and lay.is_linear_layer(layer):   # the conv's parts add up to its channels
            parts = [roles[r] for r in CONV_PARTS]
            want = logical_shapes(lay, layer)["lin_conv"][0]
            got = sum(ckpt.tensors[n].shape[0] for n in parts)
            if got != want:
                raise WiscaError(f"{ckpt.root / ckpt.tensors[parts[0]].shard}: tensors {', '.join(parts)} "
                                 f"have {got} channels together, expected {want} from config.json")
    for name in ckpt.tensors:
        m = pattern.match(name)
        if m and name not in known:
            where = ckpt.root / ckpt.tensors[name].shard
            layer, extra = int(m.group(1)), int(lay.value(spec.extra_layers, 0) or 0)
            if lay.layers <= layer < lay.layers + extra:   # not loaded by transformers (MTP): copied as it is
                continue
            if layer >= lay.layers:
                also = f" + {spec.extra_layers}={extra}" if spec.extra_layers else ""
                raise WiscaError(f"{where}: tensor {name} is beyond num_hidden_layers={lay.layers}{also} in config.json")
            raise WiscaError(f"{where}: tensor {name} is not part of the {spec.name} architecture spec "
                             f"(check config.json, e.g. attention_bias)")


# -- writing ---------------------------------------------------------------------------------
def build_header(tensors: list[TensorInfo], metadata: dict[str, str] | None, like: int | None = None) -> bytes:
    """A safetensors header. ``like``: another file's data start; the header is then
    padded with spaces (which the format allows) so the data starts at the same offset
    modulo the page size, and every tensor can be read from one file and written to the
    other by direct I/O with no copy in between."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [t.rel_start, t.rel_start + t.nbytes]}
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    if like is not None and like % 8 == 0:
        body += b" " * ((like - 8 - len(body)) % PAGE)
    return struct.pack("<Q", len(body)) + body


class ShardWriter:
    """One output shard with the same tensors and layout as an input shard.

    The header goes first; each tensor is then written at its own offset, in any order,
    through ``OutputFile`` (O_DIRECT where the filesystem has it). A shard is fsynced as
    soon as its last tensor is in.
    """

    def __init__(self, path: Path, shard: Shard, metadata: dict[str, str] | None, direct: bool = True,
                 page_like_source: bool = False):
        self.path = path
        header = build_header(shard.tensors, metadata, shard.data_start if page_like_source else None)
        self.data_start = len(header)
        self.offsets = {t.name: (t.rel_start, t.nbytes) for t in shard.tensors}
        self.pending = set(self.offsets)
        self.done = False
        self.file = OutputFile(path, self.data_start + sum(t.nbytes for t in shard.tensors), direct)
        self.file.write(0, header)

    def offset(self, name: str) -> int:
        """Where the tensor's first byte goes in the file (its buffer is placed to match)."""
        return self.data_start + self.offsets[name][0]

    def write(self, name: str, raw: torch.Tensor) -> None:
        rel, nbytes = self.offsets[name]
        if raw.numel() != nbytes:
            raise AssertionError(f"{name}: {raw.numel()} bytes, expected {nbytes}")
        self.write_part(name, 0, raw, last=True)

    def write_part(self, name: str, offset: int, raw: torch.Tensor, last: bool) -> None:
        """Write part of a tensor at ``offset`` bytes into it; ``last`` marks it complete."""
        rel, nbytes = self.offsets[name]
        if offset + raw.numel() > nbytes or (last and offset + raw.numel() != nbytes):
            raise AssertionError(f"{name}: part [{offset}, +{raw.numel()}) does not fit {nbytes} bytes")
        if raw.numel():
            self.file.write(self.data_start + rel + offset, raw.numpy())
        if last:
            self.pending.remove(name)
            if not self.pending:
                self.close()

    def close(self) -> None:
        if self.pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:3]}")
        if not self.done:
            self.file.close()
            self.done = True

    def abort(self) -> None:
        self.file.abort()
