"""Reading and writing big files at disk speed: O_DIRECT where it pays, buffered otherwise.

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

Reading has the same trade-off the other way round. A buffered read of bytes that are not
in the page cache costs 0.1 to 3 CPU-seconds per GB on this kind of machine (page
allocation, most of all where the guest's free memory has gone back to the host, cache
insertion, a copy), against 0.1 for a direct read; bytes already in the cache cost 0.13
to copy, and a direct read would fetch them from the disk again. ``InputFile.read_into`` asks the kernel which it is (``cachestat``, else
``mincore``) and reads each large range the cheaper way.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading

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
    """A new file of known ``size`` (None: as long as the bytes written), written piecewise at
    any offsets, each byte once."""

    def __init__(self, path: os.PathLike, size: int | None, direct: bool = True, gaps: bool = False):
        # gaps: bytes may stay unwritten (zeros), so pages are not required to fill up
        self.path, self.size, self.end, self.gaps = path, size, 0, gaps
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct = direct and _set_direct(self.fd, True)
        self.partial: dict[int, tuple[bytearray, int]] = {}   # page -> (its bytes, bytes filled)
        self._staging: memoryview | None = None
        self._page: memoryview | None = None

    # -- public --------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Write ``data`` (anything with the buffer protocol) at ``offset``."""
        view = memoryview(data).cast("B")
        if offset < 0 or (self.size is not None and offset + len(view) > self.size):
            raise AssertionError(f"{self.path}: write [{offset}, +{len(view)}) outside {self.size} bytes")
        self.end = max(self.end, offset + len(view))
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
        if self.size is None:
            self.size = self.end
        if self.direct:
            for page, (buf, filled) in sorted(self.partial.items()):
                if filled != self._page_bytes(page) and not self.gaps:
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
        return PAGE if self.size is None else min(PAGE, self.size - page * PAGE)

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


# -- reading -------------------------------------------------------------------------------
DIRECT_READ_MIN = 1 << 20    # smaller reads go through the page cache (a direct read of a
                             # few pages gains nothing and can split a cached page's neighbours)
READ_PIECE = 4 << 20          # bytes per direct read
CACHED_FRACTION = 0.5        # ranges with at least this share of their pages cached are copied


class InputFile:
    """A file read with positioned reads into the caller's memory.

    A range that is mostly in the page cache is copied from it; one that is not is read
    with ``O_DIRECT`` straight into the caller's buffer when the buffer's address is
    congruent to the file offset modulo ``PAGE`` (``memory.carve`` places tensors so),
    its ragged first and last page through a small aligned page. Either way the caller
    gets the same bytes; only the CPU spent differs.
    """

    def __init__(self, path: os.PathLike, direct: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self._direct = direct
        self._direct_fd: int | None = None
        self._lock = threading.Lock()
        self._pages = threading.local()    # one bounce page per reading thread
        self.direct_bytes = 0              # how many bytes came by each path (for tests and profiles)
        self.cached_bytes = 0

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the file's bytes from ``offset``; EOF before the end is an
        ``EOFError``, other failures ``OSError``."""
        view = memoryview(view).cast("B")
        n = len(view)
        lo, hi = -(-offset // PAGE) * PAGE, (offset + n) // PAGE * PAGE   # the aligned middle
        fd = self._direct_fd_or_none() if n >= DIRECT_READ_MIN and hi - lo >= PAGE else None
        if fd is None or (_address(view) - offset) % PAGE or _cached_fraction(self.fd, offset, n) >= CACHED_FRACTION:
            self.cached_bytes += n
            return _pread_all(self.fd, view, offset)
        try:
            if offset < lo:
                self._edge(fd, view[:lo - offset], offset)
            for at in range(lo, hi, READ_PIECE):   # pieces: a long read would queue ahead of the writes
                _pread_all(fd, view[at - offset:min(hi, at + READ_PIECE) - offset], at)
            if hi < offset + n:
                self._edge(fd, view[hi - offset:], hi)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False          # the device wants a coarser alignment: buffered from now on
            return _pread_all(self.fd, view, offset)
        self.direct_bytes += n

    @property
    def reads_direct(self) -> bool:
        """Whether ranges not in the page cache are read with ``O_DIRECT``."""
        return self._direct_fd_or_none() is not None

    def close(self) -> None:
        for fd in (self.fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self._direct_fd = -1, None

    def _direct_fd_or_none(self) -> int | None:
        if not self._direct:
            return None
        with self._lock:
            if self._direct_fd is None:
                self._direct_fd = -1       # no O_DIRECT on this platform, or (EINVAL) on this filesystem
                if hasattr(os, "O_DIRECT"):
                    try:
                        self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                    except OSError:
                        pass
            return self._direct_fd if self._direct_fd >= 0 else None

    def _edge(self, fd: int, view: memoryview, offset: int) -> None:
        """Bytes that share a page with other data: read their page, copy the part asked."""
        page = getattr(self._pages, "buf", None)
        if page is None:
            page = self._pages.buf = _aligned_block(PAGE)
        start = offset // PAGE * PAGE
        got = os.preadv(fd, [page], start)
        at = offset - start
        if got < at + len(view):
            raise EOFError(f"{self.path}: file ended at byte {start + got}, before {offset + len(view)}")
        view[:] = page[at:at + len(view)]


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"file ended at byte {offset + done}, before {offset + len(view)}")
        done += got


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_SYS_CACHESTAT = 451     # the same number on every Linux architecture (kernel 6.5 and later)
_libc = None
_has_cachestat = sys.platform.startswith("linux")


def _cached_fraction(fd: int, offset: int, n: int) -> float:
    """The share of ``[offset, offset + n)``'s pages in the page cache; 1.0 when the kernel
    cannot tell us (then the buffered read, which is always right, is used)."""
    global _libc, _has_cachestat
    if n <= 0:
        return 1.0
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return 1.0
    first, last = offset // PAGE, (offset + n - 1) // PAGE
    pages = last - first + 1
    if _has_cachestat:
        rng, stat = _CacheRange(first * PAGE, pages * PAGE), _CacheStat()
        try:
            if _libc.syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_uint(fd), ctypes.byref(rng),
                             ctypes.byref(stat), ctypes.c_uint(0)) == 0:
                return min(1.0, stat.nr_cache / pages)
        except (AttributeError, OSError):
            pass
        _has_cachestat = False          # ENOSYS (an older kernel) or no syscall(): mincore below
    return _mincore_fraction(fd, first * PAGE, pages)


def _mincore_fraction(fd: int, start: int, pages: int) -> float:
    try:
        libc = _libc
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        length = pages * PAGE
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 1.0
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, length, vec) != 0:
                return 1.0
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, length)
    except (AttributeError, OSError):
        return 1.0


def pwrite_all(fd: int, raw, at: int) -> None:
    """Write all of ``raw`` at file offset ``at``."""
    view = memoryview(raw).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)


def copy_range(src: int, offset: int, dst: int, at: int, n: int) -> None:
    """``n`` bytes from ``src`` at ``offset`` to ``dst`` at ``at``, file to file in the kernel."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, offset + done, at + done)
            if got == 0:
                raise OSError("source file ended")
            done += got
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while done < n:   # a filesystem without copy_file_range: through user space
            block = os.pread(src, min(n - done, 64 << 20), offset + done)
            if not block:
                raise OSError("source file ended") from e
            pwrite_all(dst, block, at + done)
            done += len(block)
