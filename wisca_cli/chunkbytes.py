"""A ``torch.save``'d tensor's bytes, viewed and edited in place.

DCP stores every chunk as the output of ``torch.save(chunk)``: a zip archive, stored
(not compressed), whose ``archive/data/0`` record holds the tensor's bytes and whose
CRC-32 sits twice, in the record's data descriptor and in the central directory.
Rescaling a chunk changes only those bytes and the two CRCs, so a chunk can be read into
reusable memory, viewed as a tensor, multiplied in place and written out again: no
unpickling of the data, no re-serialising, no fresh memory per chunk. Everything else in
the archive (the pickle, the serialization id, the alignment padding) stays byte for byte.

``locate`` accepts only what it fully understands: one contiguous, little-endian tensor
of the expected dtype and shape at storage offset 0, its record stored at full length.
For anything else it returns None, and the caller takes the slow road (``torch.load``,
``torch.save``), which also names a damaged chunk.
"""

from __future__ import annotations

import pickle
import re
import struct
import zlib
from dataclasses import dataclass

import torch

_EOCD, _EOCD64, _LOCATOR = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CENTRAL, _LOCAL, _DESCRIPTOR = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_DATA = re.compile(rb"(^|/)data/\d+$")
_FULL = 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """Where a chunk's tensor bytes are inside its archive."""
    data: int                  # offset of the first byte
    nbytes: int
    crc_at: tuple[int, ...]    # offsets of the CRC-32 fields that describe them


def locate(raw, dtype: torch.dtype, shape: tuple[int, ...]) -> Record | None:
    """The tensor record of ``raw`` (a ``torch.save`` archive), or None when it is not one
    contiguous ``dtype`` tensor of ``shape`` stored the plain way."""
    try:
        return _locate(memoryview(raw).cast("B"), dtype, tuple(shape))
    except (struct.error, ValueError, IndexError, pickle.UnpicklingError, EOFError):
        return None


def view(raw, record: Record, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor, sharing ``raw``'s memory (``raw`` must be writable)."""
    n = record.nbytes // dtype.itemsize if dtype.itemsize else 0
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype, count=n, offset=record.data).view(shape)


def seal(raw, record: Record) -> None:
    """Write the CRC-32 of the (changed) tensor bytes into the archive's fields."""
    mv = memoryview(raw).cast("B")
    crc = zlib.crc32(mv[record.data:record.data + record.nbytes])
    for at in record.crc_at:
        struct.pack_into("<I", mv, at, crc)


# -- the zip structure ----------------------------------------------------------------------
def _locate(mv: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> Record | None:
    entries = _central_directory(mv)
    if entries is None:
        return None
    data = [e for e in entries if _DATA.search(e["name"])]
    pkl = [e for e in entries if e["name"].endswith(b"/data.pkl") or e["name"] == b"data.pkl"]
    order = [e for e in entries if e["name"].endswith(b"/byteorder")]
    if len(data) != 1 or len(pkl) != 1 or len(order) > 1:
        return None
    if order and bytes(_contents(mv, order[0])) != b"little":
        return None
    if not _is_plain_tensor(bytes(_contents(mv, pkl[0])), dtype, shape):
        return None
    rec = data[0]
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if rec["method"] != 0 or rec["size"] != nbytes or rec["csize"] != nbytes:
        return None
    start, crc_at = record_span(mv, rec)
    stored = {struct.unpack_from("<I", mv, at)[0] for at in crc_at}
    if len(stored) != 1 or start + nbytes > len(mv):
        return None
    return Record(start, nbytes, tuple(crc_at))


def record_span(mv: memoryview, entry: dict) -> tuple[int, tuple[int, ...]]:
    """(offset of a stored record's first byte, offsets of the CRC-32 fields that describe it:
    the central directory's and the data descriptor's or the local header's)."""
    start = _data_start(mv, entry)
    crc_at = [entry["crc_at"]]
    if entry["flags"] & 0x8:      # a data descriptor follows the bytes (torch.save writes one)
        at = start + entry["size"]
        if bytes(mv[at:at + 4]) == _DESCRIPTOR:
            at += 4
        crc_at.append(at)
    else:
        crc_at.append(entry["local"] + 14)
    return start, tuple(crc_at)


def _central_directory(mv: memoryview) -> list[dict] | None:
    tail = max(0, len(mv) - (1 << 16) - 22)
    end = bytes(mv[tail:]).rfind(_EOCD)
    if end < 0:
        return None
    end += tail
    count, _, offset = struct.unpack_from("<HII", mv, end + 10)
    if count == 0xFFFF or offset == _FULL:                     # zip64
        loc = end - 20
        if loc < 0 or bytes(mv[loc:loc + 4]) != _LOCATOR:
            return None
        (z,) = struct.unpack_from("<Q", mv, loc + 8)
        if bytes(mv[z:z + 4]) != _EOCD64:
            return None
        count, _, offset = struct.unpack_from("<QQQ", mv, z + 32)
    entries, p = [], offset
    for _ in range(count):
        if bytes(mv[p:p + 4]) != _CENTRAL:
            return None
        flags, method = struct.unpack_from("<HH", mv, p + 8)
        _, csize, size, n, m, k = struct.unpack_from("<IIIHHH", mv, p + 16)
        (local,) = struct.unpack_from("<I", mv, p + 42)
        name = bytes(mv[p + 46:p + 46 + n])
        wide = [v == _FULL for v in (size, csize, local)]
        if any(wide):                                          # the zip64 extra field holds them
            values = iter(_zip64_extra(mv[p + 46 + n:p + 46 + n + m], sum(wide)))
            size, csize, local = (next(values) if w else v for v, w in zip((size, csize, local), wide))
        entries.append(dict(name=name, flags=flags, method=method, csize=csize, size=size,
                            local=local, crc_at=p + 16))
        p += 46 + n + m + k
    return entries


def _zip64_extra(extra: memoryview, want: int) -> list[int]:
    p = 0
    while p + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, p)
        if tag == 1:
            return list(struct.unpack_from(f"<{want}Q", extra, p + 4))
        p += 4 + n
    raise ValueError("no zip64 field")


def _data_start(mv: memoryview, entry: dict) -> int:
    at = entry["local"]
    if bytes(mv[at:at + 4]) != _LOCAL:
        raise ValueError("no local header")
    n, m = struct.unpack_from("<HH", mv, at + 26)
    return at + 30 + n + m


def _contents(mv: memoryview, entry: dict) -> memoryview:
    if entry["method"] != 0:
        raise ValueError("compressed record")
    start = _data_start(mv, entry)
    return mv[start:start + entry["size"]]


# -- the pickle: one plain tensor ------------------------------------------------------------
class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Tensor:
    def __init__(self, storage, offset, size, stride, *rest):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _Unpickler(pickle.Unpickler):
    """Reads ``torch.save``'s pickle of one tensor without building it; any other global
    (a subclass, a quantized tensor, a nested container) is refused."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str)):
            raise pickle.UnpicklingError("storage")
        cls = getattr(torch, pid[1], None)
        dtype = getattr(cls, "dtype", None) if cls is not None else None
        if not isinstance(dtype, torch.dtype) or pid[2] != "0":
            raise pickle.UnpicklingError("storage type")
        return _Storage(dtype), int(pid[4])


def _is_plain_tensor(pkl: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    import io
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # TypedStorage classes warn when touched
        t = _Unpickler(io.BytesIO(pkl)).load()
    if not isinstance(t, _Tensor):
        return False
    storage, numel = t.storage
    contiguous, step = [], 1
    for n in reversed(shape):
        contiguous.append(step)
        step *= n
    return (storage.dtype == dtype and t.offset == 0 and t.size == shape and numel == step
            and (t.stride == tuple(reversed(contiguous)) or step <= 1))
