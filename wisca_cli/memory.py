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


def tune_allocator() -> bool:
    """Reuse freed memory instead of returning it to the kernel (glibc only; else a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_ARENA_MAX, 1) == 1
    ok &= mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1     # up to 1 GiB from the reusable heap
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return bool(ok)
