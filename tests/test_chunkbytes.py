"""A torch.save'd chunk edited in place (wisca_cli/chunkbytes.py), and the ring memory the
DCP backend reads chunks into (dcp.Ring)."""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from wisca_cli import chunkbytes
from wisca_cli.dcp import Ring


def _saved(obj) -> bytearray:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return bytearray(buf.getvalue())


PLAIN = {
    "bf16 matrix": torch.randn(40, 30).bfloat16(),
    "fp32 vector": torch.randn(7),
    "fp32 scalar": torch.tensor(3.0),
    "fp16 3-d": torch.randn(2, 3, 5).half(),
    "int64": torch.arange(6).view(2, 3),
    "empty": torch.empty(0, 4),
}


@pytest.mark.parametrize("name", PLAIN)
def test_a_plain_chunk_is_viewed_edited_and_sealed_in_place(name):
    t = PLAIN[name]
    raw = _saved(t)
    before = bytes(raw)
    rec = chunkbytes.locate(raw, t.dtype, tuple(t.shape))
    assert rec is not None and rec.nbytes == t.numel() * t.element_size()
    view = chunkbytes.view(raw, rec, t.dtype, tuple(t.shape))
    assert torch.equal(view, t)
    want = t * 4 if t.is_floating_point() else t + 1
    view.copy_(want)
    chunkbytes.seal(raw, rec)
    assert torch.equal(torch.load(io.BytesIO(bytes(raw)), weights_only=True), want)
    assert zipfile.ZipFile(io.BytesIO(bytes(raw))).testzip() is None      # every CRC-32 right
    changed = [i for i, (a, b) in enumerate(zip(before, raw)) if a != b]
    allowed = set(range(rec.data, rec.data + rec.nbytes)) | {a + k for a in rec.crc_at for k in range(4)}
    assert set(changed) <= allowed and len(raw) == len(before)             # nothing else moved


def test_an_unsealed_edit_is_caught_by_the_crc():
    t = torch.randn(64)
    raw = _saved(t)
    rec = chunkbytes.locate(raw, t.dtype, (64,))
    chunkbytes.view(raw, rec, t.dtype, (64,)).mul_(2)
    assert zipfile.ZipFile(io.BytesIO(bytes(raw))).testzip() is not None


@pytest.mark.parametrize("obj, dtype, shape", [
    (torch.randn(3, 4).t(), torch.float32, (4, 3)),          # strided: bytes not in row order
    (torch.randn(10)[2:5], torch.float32, (3,)),              # a view at a storage offset
    (torch.randn(4), torch.bfloat16, (4,)),                   # another dtype than the metadata's
    (torch.randn(4), torch.float32, (2, 2)),                  # another shape
    ({"a": torch.randn(2)}, torch.float32, (2,)),             # not a tensor
    ([torch.randn(2), torch.randn(2)], torch.float32, (2,)),  # two storages
])
def test_anything_but_one_plain_tensor_is_left_to_torch_load(obj, dtype, shape):
    assert chunkbytes.locate(_saved(obj), dtype, shape) is None


def test_damaged_archives_are_left_to_torch_load():
    raw = _saved(torch.randn(16))
    assert chunkbytes.locate(b"not a zip at all" * 8, torch.float32, (16,)) is None
    assert chunkbytes.locate(raw[:-30], torch.float32, (16,)) is None      # no end record
    cut = bytearray(raw)
    cut[0:4] = b"\0\0\0\0"                                                 # the pickle's local header gone
    assert chunkbytes.locate(cut, torch.float32, (16,)) is None
    zeroed = bytearray(raw)
    end = zeroed.rfind(b"PK\x01\x02")
    zeroed[end:end + 4] = b"\0\0\0\0"                                      # central directory broken
    assert chunkbytes.locate(zeroed, torch.float32, (16,)) is None


def test_ring_memory_is_reused_in_order_and_never_overwritten_early():
    ring = Ring(size=1 << 20)
    pool = ThreadPoolExecutor(1)
    held = []
    for i in range(12):      # 12 x 200 KiB through 1 MiB: wraps around twice
        buf, slot = ring.take(200 << 10)
        assert slot is not None
        buf[:] = bytes([i]) * len(buf)
        held.append((i, buf))
        slot[2] = pool.submit(lambda: None)
    # the last four regions (800 KiB) are still intact: nothing live was handed out twice
    for i, buf in held[-4:]:
        assert bytes(buf) == bytes([i]) * len(buf)
    starts = [lo for lo, _, _ in ring.live]
    assert len(set(starts)) == len(starts)
    ring.drain()
    pool.shutdown()


def test_ring_gives_fresh_memory_rather_than_memory_still_in_use():
    ring = Ring(size=1 << 20)
    first, slot = ring.take(300 << 10)         # read, not yet handed to the writer
    first[:] = b"\1" * len(first)
    _, slot2 = ring.take(300 << 10)
    assert slot2 is not None
    third, slot3 = ring.take(450 << 10)        # would wrap onto the first: fresh instead
    assert slot3 is None
    third[:] = b"\3" * len(third)
    assert bytes(first) == b"\1" * len(first)
    big, slot4 = ring.take(600 << 10)          # more than half the ring: always fresh
    assert slot4 is None and len(big) == 600 << 10
    Ring.release(slot)
    Ring.release(slot2)
    again, slot5 = ring.take(450 << 10)        # both released: their memory is used again
    assert slot5 is not None and slot5[0] == 0
