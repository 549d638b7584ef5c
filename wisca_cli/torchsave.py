"""A ``torch.save`` archive: its structure read without building it, its tensor bytes
rewritten in bounded pieces.

``torch.save`` writes a zip archive, stored (not compressed): ``<name>/data.pkl`` holds the
object tree with every tensor as a persistent id of a storage, and each storage is one
record ``<name>/data/<key>``. ``read`` unpickles ``data.pkl`` with an allow-list (torch's
tensor rebuild functions, containers, dtypes and the classes the caller names, read into
inert stand-ins) where every tensor becomes a ``TensorRef``: which storage, at which element
offset, what shape and strides. No tensor data is read and no code from the file runs.

``rewrite`` then copies the archive to a new file byte for byte, except that the elements
the caller's edits name are multiplied on the way (``Edit``: a run of a storage's elements
and the function that rescales it) and each changed record's CRC-32 is written anew. The
pickle, the alignment padding, the serialization id: all unchanged. Memory is one buffer of
``CHUNK`` bytes, whatever the size of the file; each byte is read once and written once
(untouched records go file to file in the kernel).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import chunkbytes
from .errors import WiscaError, reason
from .fileio import copy_range as _copy_range, pwrite_all as _pwrite_all

CHUNK = 16 << 20


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the archive, unread."""
    storage: Storage
    offset: int                    # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def contiguous(self) -> bool:
        step = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != step:
                return False
            step *= n
        return self.offset + self.numel <= self.storage.numel


class StandIn:
    """An object of a class the format pickles, kept as data: its constructor arguments
    (``args``) and its state (``state``); nothing of the class runs."""

    foreign: tuple[str, str] = ("", "")
    args: tuple = ()               # NEWOBJ makes one without calling __init__
    state: object = None

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, kwargs or None

    def __setstate__(self, state):
        self.state = state

    def get(self, key, default=None):
        """A field of the pickled object's state."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:   # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        return state.get(key, default) if isinstance(state, dict) else default

    def __repr__(self):
        return f"{self.foreign[0]}.{self.foreign[1]}{self.args or ''}"


_STAND_INS: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (StandIn,), {"__module__": module, "__qualname__": name, "foreign": key})
    return _STAND_INS[key]


@dataclass
class Record:
    name: str
    data: int                      # file offset of the first byte
    nbytes: int
    crc_at: tuple[int, ...]        # file offsets of the CRC-32 fields describing the bytes


@dataclass
class Archive:
    path: Path
    obj: object                    # the pickled tree, tensors as TensorRef
    records: dict[str, Record]     # storage key -> its record
    size: int
    dtypes: dict[str, torch.dtype]  # storage key -> its dtype
    classes: set[tuple[str, str]] = field(default_factory=set)   # stand-in classes met


class _Dict(dict):
    """An OrderedDict (a state dict keeps a ``_metadata`` attribute on it)."""


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return TensorRef(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_from_type(func, new_type, args, state):
    if new_type not in (torch.Tensor, torch.nn.Parameter):   # attributes in ``state`` stay in the pickle
        raise pickle.UnpicklingError(f"a tensor subclass {getattr(new_type, '__name__', new_type)}")
    return func(*args)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, classes: set[tuple[str, str]]):
        super().__init__(file)
        self.classes, self.met = classes, set()

    def find_class(self, module, name):
        key = (module, name)
        if key in self.classes:
            self.met.add(key)
            return stand_in(module, name)
        if key == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if key == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if key == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if key == ("collections", "OrderedDict"):
            return _Dict
        if key == ("torch", "Size"):
            return tuple
        if key == ("torch", "Tensor"):
            return torch.Tensor
        if key == ("torch.nn.parameter", "Parameter"):
            return torch.nn.Parameter
        if key == ("copyreg", "_reconstructor"):
            return _reconstructor
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("a persistent id that is not a storage")
        kind = pid[1]
        dtype = kind if isinstance(kind, torch.dtype) else getattr(kind, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"storage of type {kind!r}")
        return Storage(str(pid[2]), dtype, int(pid[4]))


def _reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, StandIn)) or base is not object:
        raise pickle.UnpicklingError("copyreg._reconstructor of a class outside the allow-list")
    obj = cls.__new__(cls)
    obj.args, obj.state = (), None
    return obj


def read(path: str | os.PathLike, classes: set[tuple[str, str]] = frozenset()) -> Archive:
    """The archive's structure; ``WiscaError`` naming the file for anything but a plain,
    stored, little-endian ``torch.save`` zip whose pickle holds only tensors, containers,
    dtypes and ``classes`` (module, name) (read into ``StandIn`` objects)."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mv = memoryview(mm)
            try:
                return _read(path, mv, set(classes))
            finally:
                mv.release()
    except WiscaError:
        raise
    except OSError as e:
        raise WiscaError(f"{where}: cannot read: {e.strerror or e}") from None
    except (ValueError, struct.error, IndexError) as e:
        raise WiscaError(f"{where}: not a torch.save archive wisca can read ({reason(e, 80)})") from None


def _read(path: Path, mv: memoryview, classes: set) -> Archive:
    where = str(path)
    entries = chunkbytes._central_directory(mv)
    if entries is None:
        raise WiscaError(f"{where}: not a torch.save zip archive (legacy or damaged file)")
    by_name = {e["name"].decode("utf-8", "replace"): e for e in entries}
    pkl = [n for n in by_name if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise WiscaError(f"{where}: not a torch.save archive (no single data.pkl)")
    root = pkl[0][:-len("data.pkl")]
    order = by_name.get(root + "byteorder")
    if order is not None and bytes(chunkbytes._contents(mv, order)) != b"little":
        raise WiscaError(f"{where}: a big-endian torch.save archive")
    u = _Unpickler(io.BytesIO(bytes(chunkbytes._contents(mv, by_name[pkl[0]]))), classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TypedStorage classes warn when touched
            obj = u.load()
    except pickle.UnpicklingError as e:
        raise WiscaError(f"{where}: {e} (wisca runs no code from a checkpoint)") from None
    except Exception as e:   # noqa: BLE001 - a damaged pickle
        raise WiscaError(f"{where}: damaged pickle ({type(e).__name__}: {reason(e, 60)})") from None
    records = {}
    for name, e in by_name.items():
        if not name.startswith(root + "data/"):
            continue
        if e["method"] != 0 or e["size"] != e["csize"]:
            raise WiscaError(f"{where}: {name} is compressed; torch.save stores records uncompressed")
        start, crc_at = chunkbytes.record_span(mv, e)
        if start + e["size"] > len(mv):
            raise WiscaError(f"{where}: {name} runs past the end of the file (truncated?)")
        records[name[len(root) + len("data/"):]] = Record(name, start, e["size"], crc_at)
    dtypes = {}
    for t in tensors(obj):
        rec = records.get(t.storage.key)
        if rec is None or rec.nbytes != t.storage.numel * t.dtype.itemsize:
            raise WiscaError(f"{where}: storage {t.storage.key} is missing or of the wrong size (truncated?)")
        if dtypes.setdefault(t.storage.key, t.dtype) != t.dtype:
            raise WiscaError(f"{where}: storage {t.storage.key} is viewed as two dtypes")
    return Archive(path, obj, records, len(mv), dtypes, u.met)


def tensors(obj) -> list[TensorRef]:
    out = []

    def walk(o):
        if isinstance(o, TensorRef):
            out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple, set, frozenset)):
            for v in o:
                walk(v)
        elif isinstance(o, StandIn):
            walk(o.args)
            walk(o.state)

    walk(obj)
    return out


@dataclass
class Edit:
    """Elements ``[start, start + count)`` of a storage, rescaled by ``fn(values, first)``:
    ``values`` a run of them (a tensor of the storage's dtype, changed in place), ``first``
    the index of its first element counted from ``start``."""
    key: str
    start: int
    count: int
    fn: Callable[[torch.Tensor, int], None]


def rewrite(archive: Archive, out: str | os.PathLike, edits: list[Edit], durable: bool = True) -> None:
    """Write ``archive`` to ``out``, every byte as it is but the elements ``edits`` name,
    and the changed records' CRCs. Edits of one storage must not overlap. A changed record
    streams through ``DEPTH`` buffers of ``CHUNK`` bytes: one thread reads ahead, the calling
    thread rescales, one thread computes the CRC and writes, in order. ``durable``: fsync
    the file before returning (else the caller does, e.g. after writing several at once)."""
    by_key: dict[str, list[Edit]] = {}
    for e in edits:
        if e.count:
            by_key.setdefault(e.key, []).append(e)
    for key, es in by_key.items():
        es.sort(key=lambda e: e.start)
        for a, b in zip(es, es[1:]):
            if a.start + a.count > b.start:
                raise ValueError(f"{archive.path}: overlapping edits of storage {key}")
    changed = sorted(((archive.records[k], es) for k, es in by_key.items()), key=lambda r: r[0].data)
    crcs = {}
    src = os.open(archive.path, os.O_RDONLY)
    try:
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            size = min(CHUNK, max([rec.nbytes for rec, _ in changed] + [1]))
            bufs = [bytearray(size) for _ in range(DEPTH if changed else 0)]
            with ThreadPoolExecutor(1, "wisca-read") as reader, ThreadPoolExecutor(1, "wisca-write") as writer:
                for rec, es in changed:
                    _copy_range(src, pos, dst, pos, rec.data - pos)
                    crcs[rec.name] = _stream_record(src, dst, rec, es, archive.dtypes[es[0].key], bufs, reader,
                                                    writer)
                    pos = rec.data + rec.nbytes
            _copy_range(src, pos, dst, pos, archive.size - pos)
            for rec, _ in changed:
                for at in rec.crc_at:
                    os.pwrite(dst, struct.pack("<I", crcs[rec.name]), at)
            if durable:
                os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


DEPTH = 4     # buffers of a record in flight: read ahead, rescaled, written


def _stream_record(src: int, dst: int, rec: Record, edits: list[Edit], dtype: torch.dtype, bufs: list,
                   reader: ThreadPoolExecutor, writer: ThreadPoolExecutor) -> int:
    size = dtype.itemsize
    step = max(size, (len(bufs[0]) // size) * size)
    starts = list(range(0, rec.nbytes, step))
    crc = [0]
    reads: dict[int, Future] = {}
    writes: list[Future | None] = [None] * len(bufs)

    def read(k: int, done: int, n: int) -> None:
        if os.preadv(src, [memoryview(bufs[k])[:n]], rec.data + done) != n:
            raise WiscaError(f"{rec.name}: the file ended early (truncated?)")

    def write(k: int, done: int, n: int) -> None:
        view = memoryview(bufs[k])[:n]
        crc[0] = zlib.crc32(view, crc[0])       # in order: one writer thread
        _pwrite_all(dst, view, rec.data + done)

    def start_read(idx: int) -> None:
        k = idx % len(bufs)
        if writes[k] is not None:
            writes[k].result()                  # the buffer's last write is done
            writes[k] = None
        done = starts[idx]
        reads[idx] = reader.submit(read, k, done, min(step, rec.nbytes - done))

    ahead = len(bufs) - 1
    i = 0
    try:
        for idx in range(min(ahead, len(starts))):
            start_read(idx)
        for idx, done in enumerate(starts):
            reads.pop(idx).result()
            if idx + ahead < len(starts):
                start_read(idx + ahead)
            k, n = idx % len(bufs), min(step, rec.nbytes - done)
            lo, hi = done // size, (done + n) // size          # element range of this block
            while i < len(edits) and edits[i].start + edits[i].count <= lo:
                i += 1
            j = i
            if j < len(edits) and edits[j].start < hi:
                values = torch.frombuffer(bufs[k], dtype=dtype, count=n // size)
                while j < len(edits) and edits[j].start < hi:
                    e = edits[j]
                    a, b = max(e.start, lo), min(e.start + e.count, hi)
                    e.fn(values[a - lo:b - lo], a - e.start)
                    j += 1
            writes[k] = writer.submit(write, k, done, n)
        for f in writes:
            if f is not None:
                f.result()
    finally:   # on an error, nothing may still touch the buffers or the files
        for f in [*reads.values(), *writes]:
            if f is not None:
                f.cancel()
                try:
                    f.result()
                except BaseException:   # noqa: BLE001 - the first error is the one raised
                    pass
    return crc[0]
