"""Allocator settings for streaming big tensors through a few threads.

glibc hands large buffers back to the kernel on free and gives each thread its own
arena; streaming then pays a page fault per 4 KiB for every tensor and keeps several
copies of the working set alive. One arena whose freed memory is reused keeps the
resident set at the working set (a few layers) and the pages warm.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_allocator() -> bool:
    """Reuse freed memory instead of returning it to the kernel (glibc only; else a no-op)."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_ARENA_MAX, 1) == 1
    ok &= mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1     # up to 1 GiB from the reusable heap
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return bool(ok)


def trim_heap() -> None:
    """Hand the heap's free pages back to the kernel once (glibc ``malloc_trim``; else a
    no-op): ``tune_allocator`` keeps them, which is right while layers stream through, but
    a different mix of allocations after that then stacks on top of them."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SlabPool:
    """A few fixed buffers ("slabs"), reused for stage after stage.

    Streaming a model through freshly allocated buffers costs a page fault per 4 KiB on
    every layer (six times the cost of reading the bytes) and lets the heap fragment, so
    the resident set creeps up with the model. Slabs are mapped once (``prefill``: and
    their pages faulted in on a background thread), at most ``count`` of them, so memory
    is ``count x size`` whatever the model, and every read after the first few lands in
    hot pages. ``acquire`` blocks until a slab is free;
    ``close`` wakes any waiter with ``SlabPoolClosed`` (a failed run must not hang).
    """

    def __init__(self, count: int, size: int, prefill: bool = False):
        import threading

        self.count, self.size = count, max(size, 1)
        self.free: list = []
        self.made = 0
        self.closed = False
        self.cond = threading.Condition()
        if prefill:   # map the slabs on another core while the caller starts up; not a
            # daemon: interpreter exit must not kill it inside a torch op (that aborts)
            threading.Thread(target=self._prefill, name="wisca-slabs").start()

    def _claim(self) -> bool:
        with self.cond:
            if self.made >= self.count or self.closed:
                return False
            self.made += 1
            return True

    def _make(self, touch: bool = False):
        import mmap

        import torch

        slab = torch.frombuffer(mmap.mmap(-1, self.size), dtype=torch.uint8)
        if touch:      # fault the pages in now, in torch (which lets go of the GIL), not
            slab.zero_()   # with MAP_POPULATE (mmap keeps the GIL: the main thread would stall)
        return slab

    def _prefill(self) -> None:
        while self._claim():
            self.release(self._make(touch=True))

    def acquire(self):
        with self.cond:
            while not self.free and self.made >= self.count and not self.closed:
                self.cond.wait()
            if self.closed:
                raise SlabPoolClosed()
            if self.free:
                return self.free.pop()
            self.made += 1
        return self._make()

    def release(self, slab) -> None:
        with self.cond:
            self.free.append(slab)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.free.clear()
            self.cond.notify_all()


class SlabPoolClosed(Exception):
    """Raised in a thread waiting for a slab when the run is being torn down."""


def carve(slab, nbytes: int, cursor: int, align: int | None, itemsize: int) -> tuple[object, int]:
    """A ``nbytes`` view of ``slab`` at or after ``cursor`` whose address is congruent to
    ``align`` modulo the page size (``fileio.aligned_empty``'s rule), or ``itemsize``-
    aligned without ``align``; returns (view, next cursor)."""
    from .fileio import PAGE

    base = slab.data_ptr()
    if align is not None and align % itemsize == 0:
        pos = cursor + (align - base - cursor) % PAGE
    else:
        pos = cursor + (-(base + cursor)) % 64
    if pos + nbytes > slab.numel():
        raise AssertionError(f"slab of {slab.numel()} bytes cannot hold {nbytes} more at {pos}")
    return slab[pos:pos + nbytes], pos + nbytes


def slab_bytes(sizes: list[int]) -> int:
    """Room for tensors of these sizes with any alignment (a page of slack each)."""
    from .fileio import PAGE

    return sum(sizes) + PAGE * (len(sizes) + 1)
