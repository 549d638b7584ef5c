"""The streaming machinery: direct-I/O output files, reusable slabs, and the proof that the
streamed transform writes exactly what a plain load-everything implementation would."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wisca_cli as wisca
from conftest import synthetic_llama
from wisca_cli import fileio, solve
from wisca_cli.fileio import PAGE, OutputFile, aligned_empty
from wisca_cli.memory import SlabPool, SlabPoolClosed, carve, slab_bytes
from wisca_cli.spec import layout_from_config


def _direct_supported(folder) -> bool:
    path = folder / "probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    path.unlink()
    return True


def _segments(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Cut [0, size) into pieces from 1 byte to a few pages, as tensors cut a shard."""
    cuts, at = [], 0
    while at < size:
        n = min(size - at, rng.choice([1, 2, 7, 100, PAGE - 1, PAGE, PAGE + 3, 3 * PAGE + 5, 40_000]))
        cuts.append((at, n))
        at += n
    return cuts


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_output_file_any_order_any_alignment(tmp_path, direct, seed):
    rng = random.Random(seed)
    size = rng.randrange(1, 300_000)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    segments = _segments(size, rng)
    rng.shuffle(segments)
    out = OutputFile(tmp_path / "f.bin", size, direct=direct)
    assert out.direct == (direct and _direct_supported(tmp_path))
    for at, n in segments:
        how = rng.choice(["aligned", "plain", "offset"])
        if how == "aligned":      # memory congruent to the file offset: no staging copy
            buf = aligned_empty(n, at)
        elif how == "plain":
            buf = torch.empty(n, dtype=torch.uint8)
        else:                     # deliberately misaligned
            buf = torch.empty(n + 3, dtype=torch.uint8)[3:]
        buf.copy_(data[at:at + n])
        out.write(at, buf.numpy())
    out.close()
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()


def test_aligned_buffers_go_to_the_disk_without_a_copy(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    staged = []
    real = fileio._aligned_block
    monkeypatch.setattr(fileio, "_aligned_block", lambda n: staged.append(n) or real(n))
    size = 5 * PAGE + 123
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out = OutputFile(tmp_path / "f.bin", size)
    for at, n in [(0, 3 * PAGE + 10), (3 * PAGE + 10, size - 3 * PAGE - 10)]:
        buf = aligned_empty(n, at)
        buf.copy_(data[at:at + n])
        out.write(at, buf.numpy())
    out.close()
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()
    assert STAGING_BYTES not in staged          # only page buffers for the ragged edges
    assert staged == [PAGE]


STAGING_BYTES = fileio.STAGING


def test_output_file_falls_back_to_buffered_writes_on_einval(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:      # the device refuses a direct write half-way
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", pwrite)
    size = 10 * PAGE + 17
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out = OutputFile(tmp_path / "f.bin", size)
    for at, n in _segments(size, random.Random(9)):
        out.write(at, data[at:at + n].clone().numpy())
    out.close()
    assert calls["n"] > 2
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()


def test_output_file_refuses_writes_outside_it(tmp_path):
    out = OutputFile(tmp_path / "f.bin", 10)
    with pytest.raises(AssertionError):
        out.write(8, b"abc")
    out.abort()


def test_slab_pool_blocks_until_release_and_wakes_on_close():
    pool = SlabPool(2, 1000)
    a, b = pool.acquire(), pool.acquire()
    assert a.numel() == 1000 and a.data_ptr() % PAGE == 0 and a.data_ptr() != b.data_ptr()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire()))
    t.start()
    time.sleep(0.1)
    assert got == []                      # both slabs are out: the third acquire waits
    pool.release(a)
    t.join(5)
    assert got and got[0].data_ptr() == a.data_ptr()   # the same memory, reused

    errors = []

    def waiter():
        try:
            pool.acquire()
        except SlabPoolClosed:
            errors.append("closed")

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    pool.close()
    t.join(5)
    assert errors == ["closed"] and not t.is_alive()


def test_carve_places_views_like_their_file_offsets():
    slab = SlabPool(1, slab_bytes([100, 5000, 3])).acquire()
    cursor, views = 0, []
    for n, at in ((100, 12_345), (5000, 8), (3, None)):
        v, cursor = carve(slab, n, cursor, at, 1)
        views.append(v)
        if at is not None:
            assert (v.data_ptr() - at) % PAGE == 0
    for x, y in zip(views, views[1:]):
        assert x.data_ptr() + x.numel() <= y.data_ptr()      # no overlap
    with pytest.raises(AssertionError):
        carve(slab, slab.numel(), cursor, None, 1)


# -- the streamed transform against a plain, unstreamed one ------------------------------------
def _unstreamed(src, targets=("qk", "vo", "ffn")) -> dict[str, torch.Tensor]:
    """Load everything, balance each layer with the pure functions, nothing in place."""
    config = json.loads((src / "config.json").read_text())
    layout = layout_from_config(config)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = dict(tensors)
    for layer in range(layout.layers):
        roles = layout.layer_roles(layer)
        mine = {role: tensors[name] for role, name in roles.items()}
        new, _ = solve.balance_layer(layout, layer, mine, targets, "channel")
        out.update({roles[role]: t for role, t in new.items()})
    return out


@pytest.mark.parametrize("verify", [True, False])
def test_streamed_output_equals_the_unstreamed_transform(tmp_path, verify):
    # shards cut through layers; bf16 like a real pretraining checkpoint
    src = synthetic_llama(tmp_path / "src", hidden=256, layers=5, heads=8, kv_heads=2, inter=704,
                          vocab=1000, dtype=torch.bfloat16, shards=4)
    assert len(list(src.glob("*.safetensors"))) >= 3
    dst = tmp_path / "out"
    wisca.transform(src, dst, verify=verify)
    expected = _unstreamed(src)
    got = {}
    for f in sorted(src.glob("model*.safetensors")):
        with safe_open(f, "pt") as a, safe_open(dst / f.name, "pt") as b:
            assert a.offset_keys() == b.offset_keys()
            got.update({k: b.get_tensor(k) for k in b.keys()})
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name


def test_memory_is_a_fixed_number_of_slabs(tmp_path, monkeypatch):
    """However many layers, the transform maps at most STAGE_SLABS stage slabs."""
    from wisca_cli import stream

    made = []
    real = SlabPool.acquire

    def acquire(self):
        slab = real(self)
        made.append((id(self), slab.data_ptr()))
        return slab

    monkeypatch.setattr(SlabPool, "acquire", acquire)
    src = synthetic_llama(tmp_path / "src", hidden=64, layers=12, inter=96, vocab=128)
    wisca.transform(src, tmp_path / "out")
    by_pool: dict[int, set[int]] = {}
    for pool, ptr in made:
        by_pool.setdefault(pool, set()).add(ptr)
    stage_pool = max(by_pool, key=lambda p: sum(1 for q, _ in made if q == p))   # 14 stages
    assert sum(1 for q, _ in made if q == stage_pool) == 12 + 2
    assert len(by_pool[stage_pool]) == stream.STAGE_SLABS


# -- read-ahead hints -----------------------------------------------------------------------------
def test_read_ahead_hints_follow_the_index_and_stay_within_budget(tmp_path):
    from wisca_cli import prefetch

    src = synthetic_llama(tmp_path / "src", hidden=128, layers=4, inter=256, vocab=512, shards=3)
    files = prefetch.shard_files(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert [f.name for f in files] == list(dict.fromkeys(index.values()))
    sizes = [f.stat().st_size for f in files]
    assert prefetch.advise_files(files, 10**12) == sum(sizes)
    assert prefetch.advise_files(files, sizes[0] + 5) == sizes[0] + 5     # the budget is a hard cap


def test_read_ahead_hints_never_fail(tmp_path):
    from wisca_cli import prefetch

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text("{not json")
    assert prefetch.shard_files(bad) == []
    assert prefetch.shard_files(tmp_path / "missing") == []
    assert prefetch.advise_files([tmp_path / "missing.safetensors"], 100) == 0
    prefetch.warm_start(str(bad), str(tmp_path / "missing"), "org/hub-id", "")   # no exception


def test_a_wrong_layer_is_caught_and_named_while_layers_overlap(tmp_path, monkeypatch):
    """The transformed layer's forward runs beside the next layer's balancing: the first
    diverging layer is still the one reported, and nothing is written."""
    src = synthetic_llama(tmp_path / "src", hidden=128, layers=6, inter=256, vocab=256, dtype=torch.bfloat16)
    real = solve.balance_layer

    def broken(layout, layer, tensors, *args, **kwargs):
        new, results = real(layout, layer, tensors, *args, **kwargs)
        if layer == 3:
            new["o"] = tensors["o"].mul_(2)     # one layer's output doubled
        return new, results

    monkeypatch.setattr(solve, "balance_layer", broken)
    with pytest.raises(wisca.VerificationFailed, match="diverge at layer 3"):
        wisca.transform(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
