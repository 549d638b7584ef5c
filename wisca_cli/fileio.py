"""Writing big files at disk speed: O_DIRECT with page assembly, buffered as a fallback.

A buffered ``write`` copies every byte into the page cache, and on a machine short of free
pages that copy (page allocation, reclaim, later write-back) costs more CPU than all of
WISCA's arithmetic. With ``O_DIRECT`` the disk reads the bytes straight from our memory,
so the CPU stays free for the math and the data is on disk when the call returns.

``O_DIRECT`` wants file offsets, lengths and memory addresses aligned to the device's
block size (``PAGE`` covers every common device). A tensor lands at an arbitrary offset,
so ``OutputFile.write`` splits each write into:

* the aligned middle, written straight from the caller's memory when that memory is
  aligned like the file offset (``aligned_empty`` allocates such buffers), else through
  a reusable aligned staging buffer;
* the ragged edges, copied into the file's partial pages, each written once all of its
  bytes have arrived (any order).

Filesystems without ``O_DIRECT`` (tmpfs on older kernels, some network filesystems) get
plain positioned writes instead; the bytes on disk are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os

import torch

PAGE = 4096
STAGING = 8 << 20            # bytes per staging copy when the caller's memory is unaligned
DIRECT_PIECE = 2 << 20       # bytes per direct write (about 20% faster here than one 24 MiB write)


def aligned_empty(nbytes: int, file_offset: int = 0) -> torch.Tensor:
    """A uint8 buffer whose address is congruent to ``file_offset`` modulo ``PAGE``, so
    ``OutputFile.write`` can hand its aligned middle to the disk without a copy."""
    base = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    shift = (file_offset - base.data_ptr()) % PAGE
    return base[shift:shift + nbytes]


def _aligned_block(nbytes: int) -> memoryview:
    return memoryview(mmap.mmap(-1, nbytes))     # anonymous mmaps start on a page boundary


class OutputFile:
    """A new file of known ``size``, written piecewise at any offsets, each byte once."""

    def __init__(self, path: os.PathLike, size: int, direct: bool = True):
        self.path, self.size = path, size
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct = direct and _set_direct(self.fd, True)
        self.partial: dict[int, tuple[bytearray, int]] = {}   # page -> (its bytes, bytes filled)
        self._staging: memoryview | None = None
        self._page: memoryview | None = None

    # -- public --------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Write ``data`` (anything with the buffer protocol) at ``offset``."""
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise AssertionError(f"{self.path}: write [{offset}, +{len(view)}) outside {self.size} bytes")
        if not self.direct:
            return self._pwrite_all(view, offset)
        end = offset + len(view)
        lo, hi = -(-offset // PAGE) * PAGE, end // PAGE * PAGE     # the aligned middle [lo, hi)
        if lo >= hi:                                               # inside one or two pages
            self._fill(offset, view)
            return
        if offset < lo:
            self._fill(offset, view[:lo - offset])
        self._write_aligned(lo, view[lo - offset:hi - offset])
        if hi < end:
            self._fill(hi, view[hi - offset:])

    def close(self) -> None:
        """Write the last (short) page, trim the file to its size, fsync, close."""
        if self.direct:
            for page, (buf, filled) in sorted(self.partial.items()):
                if filled != self._page_bytes(page):
                    raise AssertionError(f"{self.path}: page {page} has {filled} of "
                                         f"{self._page_bytes(page)} bytes")
                self._write_page(page, buf)
            self.partial.clear()
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- internals -------------------------------------------------------------------------
    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def _direct_pwrite(self, view: memoryview, offset: int) -> None:
        try:
            for start in range(0, len(view), DIRECT_PIECE):   # measured: 2 MiB writes beat 24 MiB ones
                self._pwrite_all(view[start:start + DIRECT_PIECE], offset + start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The device wants a coarser alignment than PAGE, or refuses O_DIRECT for this
            # file after all: finish buffered. Pages already written stay valid.
            _set_direct(self.fd, False)
            self._pwrite_all(view, offset)

    def _write_aligned(self, offset: int, view: memoryview) -> None:
        address = _address(view)
        if address % PAGE == 0:
            return self._direct_pwrite(view, offset)
        if self._staging is None:
            self._staging = _aligned_block(STAGING)
        for start in range(0, len(view), STAGING):
            part = view[start:start + STAGING]
            self._staging[:len(part)] = part
            self._direct_pwrite(self._staging[:len(part)], offset + start)

    def _page_bytes(self, page: int) -> int:
        return min(PAGE, self.size - page * PAGE)

    def _fill(self, offset: int, view: memoryview) -> None:
        """Copy bytes that share pages with other writes into those pages."""
        while len(view):
            page, at = divmod(offset, PAGE)
            n = min(len(view), PAGE - at)
            buf, filled = self.partial.get(page) or (bytearray(PAGE), 0)
            buf[at:at + n] = view[:n]
            filled += n
            if filled == self._page_bytes(page) and filled == PAGE:
                self.partial.pop(page, None)
                self._write_page(page, buf)
            else:
                self.partial[page] = (buf, filled)
            view, offset = view[n:], offset + n

    def _write_page(self, page: int, buf: bytearray) -> None:
        if self._page is None:
            self._page = _aligned_block(PAGE)
        self._page[:] = buf
        self._direct_pwrite(self._page, page * PAGE)


def _address(view: memoryview) -> int:
    import ctypes
    if view.readonly:   # ctypes wants a writable buffer; read-only data takes the copy path
        return 1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _set_direct(fd: int, on: bool) -> bool:
    import fcntl
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        return True
    except (OSError, AttributeError):   # EINVAL: the filesystem has no O_DIRECT; non-Linux
        return False
