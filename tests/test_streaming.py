"""The streaming machinery: direct-I/O output files, reusable slabs, and the proof that the
streamed transform writes exactly what a plain load-everything implementation would."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wisca_cli as wisca
from conftest import REPO, synthetic_llama
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


# -- direct reads ----------------------------------------------------------------------------------
def _cold_file(path, size, seed=0):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.write_bytes(data.numpy().tobytes())
    _evict([path])
    return data


def test_input_file_reads_cold_ranges_direct_and_cached_ranges_from_the_cache(tmp_path):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    size = 3 * fileio.DIRECT_READ_MIN + 5 * PAGE + 77            # a ragged last page
    data = _cold_file(tmp_path / "f.bin", size)
    f = fileio.InputFile(tmp_path / "f.bin")
    assert f.reads_direct
    ranges = [(0, fileio.DIRECT_READ_MIN + 10), (PAGE + 3, fileio.DIRECT_READ_MIN + 2 * PAGE),
              (size - fileio.DIRECT_READ_MIN - 5, fileio.DIRECT_READ_MIN + 5)]   # up to the end of the file
    for offset, n in ranges:       # placed like the file: straight from the disk
        buf = aligned_empty(n, offset)
        f.read_into(memoryview(buf.numpy()), offset)
        assert torch.equal(buf, data[offset:offset + n])
    assert f.direct_bytes == sum(n for _, n in ranges) and f.cached_bytes == 0
    assert _cached(tmp_path / "f.bin") < 0.5                      # and they did not fill the page cache

    offset, n = 2 * PAGE, fileio.DIRECT_READ_MIN
    misplaced = torch.empty(n + 1, dtype=torch.uint8)[1:]         # not congruent to the offset: through the cache
    f.read_into(memoryview(misplaced.numpy()), offset)
    assert torch.equal(misplaced, data[offset:offset + n]) and f.cached_bytes == n
    (tmp_path / "f.bin").read_bytes()                             # now all cached: copied from the cache
    buf = aligned_empty(size, 0)
    f.read_into(memoryview(buf.numpy()), 0)
    assert torch.equal(buf, data) and f.cached_bytes == n + size and f.direct_bytes == sum(n for _, n in ranges)
    f.close()


def test_input_file_falls_back_to_buffered_reads_on_einval(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    size = 2 * fileio.DIRECT_READ_MIN + 123
    data = _cold_file(tmp_path / "f.bin", size, seed=1)
    f = fileio.InputFile(tmp_path / "f.bin")
    real = os.preadv

    def preadv(fd, buffers, offset):
        if fd == f._direct_fd:         # the device wants a coarser alignment than a page
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(fileio.os, "preadv", preadv)
    buf = aligned_empty(size - 9, 9)
    f.read_into(memoryview(buf.numpy()), 9)
    assert torch.equal(buf, data[9:]) and not f.reads_direct
    f.close()


def test_input_file_reports_a_short_file(tmp_path):
    size = fileio.DIRECT_READ_MIN + PAGE
    _cold_file(tmp_path / "f.bin", size)
    f = fileio.InputFile(tmp_path / "f.bin")
    for offset in (0, 5, PAGE):    # 10 bytes past the end, read direct (and cold again each time)
        buf = aligned_empty(size - offset + 10, offset)
        _evict([tmp_path / "f.bin"])
        with pytest.raises(EOFError):
            f.read_into(memoryview(buf.numpy()), offset)
    f.close()


def test_a_cold_source_is_read_direct_into_slabs_placed_for_its_output(tmp_path, monkeypatch):
    """Transformed shards keep the source's data offset modulo the page size, so each
    tensor's slab place suits both the direct read and the direct write; the output is
    the same bytes as from a source in the page cache, and undo still writes the
    original header back."""
    src = synthetic_llama(tmp_path / "src", hidden=512, layers=2, inter=1024, vocab=1024, shards=2)
    files = sorted(src.glob("*.safetensors"))
    seen = {"direct": 0, "cached": 0}
    real = fileio.InputFile.close

    def close(self):
        seen["direct"] += self.direct_bytes
        seen["cached"] += self.cached_bytes
        real(self)

    monkeypatch.setattr(fileio.InputFile, "close", close)
    wisca.transform(src, tmp_path / "warm")
    assert seen["direct"] == 0
    _evict(files)
    wisca.transform(src, tmp_path / "cold")
    if _direct_supported(tmp_path):
        assert seen["direct"] >= 3 * 512 * 1024 * 2          # at least each layer's MLP came direct
    for f in files:
        a, b = (tmp_path / "warm" / f.name).read_bytes(), (tmp_path / "cold" / f.name).read_bytes()
        assert a == b
        header = lambda raw: 8 + int.from_bytes(raw[:8], "little")   # noqa: E731
        assert header(a) % PAGE == header(f.read_bytes()) % PAGE
        assert load_file(tmp_path / "cold" / f.name).keys() == load_file(f).keys()
    wisca.undo(tmp_path / "cold", tmp_path / "back")
    for f in files:
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()


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


# -- read-ahead at start-up ------------------------------------------------------------------------
def _evict(files):
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _cached(path) -> float:
    from wisca_cli.fileio import _cached_fraction
    fd = os.open(path, os.O_RDONLY)
    try:
        return _cached_fraction(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_read_ahead_follows_the_index_interleaves_sources_and_stays_within_budget(tmp_path):
    from wisca_cli import prefetch

    src = synthetic_llama(tmp_path / "src", hidden=128, layers=4, inter=256, vocab=512, shards=3)
    files = prefetch.shard_files(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert [f.name for f in files] == list(dict.fromkeys(index.values()))
    sizes = [f.stat().st_size for f in files]
    whole = prefetch.plan([files], 10**12)
    assert [(p, o) for p, o, _ in whole] == [(p, 0) for p in files]        # one piece per small shard
    assert sum(n for *_, n in whole) == sum(sizes)
    assert sum(n for *_, n in prefetch.plan([files], sizes[0] + 5)) <= sizes[0] + sizes[1]
    assert [p for p, *_ in prefetch.plan([files], sizes[0] + 5)] == files[:2]   # stops at the budget
    assert [p for p, *_ in prefetch.plan([files[:2], files[2:]], 10**12)] == [files[0], files[2], files[1]]

    _evict(files)
    assert all(_cached(f) < 0.5 for f in files)
    assert prefetch.read_ahead(prefetch.plan([files], sizes[0])) == sizes[0]
    assert _cached(files[0]) == 1.0 and _cached(files[2]) < 0.5               # what it read, and no more


def test_warm_start_reads_in_a_child_process_and_never_fails(tmp_path):
    from wisca_cli import prefetch

    src = synthetic_llama(tmp_path / "src", hidden=128, layers=4, inter=256, vocab=512, shards=3)
    files = prefetch.shard_files(src)
    _evict(files)
    script = (f"import threading; from wisca_cli import prefetch; prefetch.warm_start({str(src)!r}); "
              f"[t.join(60) for t in threading.enumerate() if t.name == 'wisca-warm-start']")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=90)
    assert all(_cached(f) == 1.0 for f in files)

    other = synthetic_llama(tmp_path / "other", hidden=64, layers=1, inter=128, vocab=256)
    prefetch._started.clear()
    prefetch.warm_start_from_argv(["wisca", "transform", "--targets", "qk", str(src), str(tmp_path / "new")])
    assert prefetch._started == {src.resolve()}
    prefetch.warm_start_from_argv(["wisca", "verify", "--json", str(other), str(src)])
    assert prefetch._started == {src.resolve(), other.resolve()}
    prefetch._started.clear()
    prefetch.warm_start_from_argv(["wisca", "--help", str(src)])
    prefetch.warm_start_from_argv(["wisca"])
    assert not prefetch._started

    stop = threading.Event()
    stop.set()
    _evict(files)
    assert prefetch.read_ahead(prefetch.plan([files], 10**12), stop=stop) == 0   # stopped: reads nothing
    script = (f"import threading; from wisca_cli import prefetch; prefetch.warm_start({str(src)!r}); "
              f"assert len(prefetch._children) == 1; prefetch.stop_read_ahead(); assert not prefetch._children; "
              f"[t.join(30) for t in threading.enumerate() if t.name == 'wisca-warm-start']; "
              f"assert not [t for t in threading.enumerate() if t.name == 'wisca-warm-start']")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=90)   # killed and reaped

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text("{not json")
    assert prefetch.shard_files(bad) == []
    assert prefetch.shard_files(tmp_path / "missing") == []
    assert prefetch.read_ahead([(tmp_path / "missing.safetensors", 0, 100)]) == 0
    prefetch.warm_start(str(bad), str(tmp_path / "missing"), "org/hub-id", "")   # no exception


def test_the_next_reference_layer_is_queued_before_this_layers_scales_go_in(tmp_path, monkeypatch):
    """The reference thread goes from layer to layer without waiting for the balancing
    thread's apply: layer l+1's reference step is started before layer l is scaled."""
    from wisca_cli import verifier

    src = synthetic_llama(tmp_path / "src", hidden=128, layers=4, inter=256, vocab=256, dtype=torch.bfloat16)
    events = []
    start, apply = verifier.StreamVerifier.start_layer, solve.apply_pair

    def logged_start(self, w, before=None):
        events.append(("ref", self._started))
        return start(self, w, before)

    def logged_apply(pair, tensors, *args, **kwargs):
        if pair.kind == "qk":   # one qk pair per layer, applied once (no norm target)
            events.append(("apply", sum(1 for e in events if e[0] == "apply")))
        return apply(pair, tensors, *args, **kwargs)

    monkeypatch.setattr(verifier.StreamVerifier, "start_layer", logged_start)
    monkeypatch.setattr(solve, "apply_pair", logged_apply)
    report = wisca.transform(src, tmp_path / "out")
    assert report["verification"]["passed"] and report["verification"]["identical"]
    assert sorted(events) == [(kind, i) for kind in ("apply", "ref") for i in range(4)]   # once each
    for layer in range(3):
        assert events.index(("ref", layer + 1)) < events.index(("apply", layer)), events


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
