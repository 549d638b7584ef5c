"""Get the disk going early: read a checkpoint's first bytes while torch imports.

Importing torch takes one to three seconds of CPU on one core, and with nothing else
going on the disk would sit idle all that time (measured: 24 MB read during a 2.5 s
start-up). ``warm_start`` forks a small reader process before torch is imported. It
reads the first shards (up to 4 GiB and a quarter of the available memory) into the page
cache, in the order the transform will need them, and the transform then copies those
bytes from the cache.

- Real reads: ``posix_fadvise(WILLNEED)`` reads one read-ahead window per call on
  current kernels (about 4 MB a file here).
- A process, not a thread: loading libtorch holds the GIL for long stretches.
- It ends at its budget, when its parent has gone, or when the command's own reader
  starts (``stop_read_ahead``): page-cache reads cost far more CPU than direct ones, and
  once the transform runs it needs both cores.

Deliberately free of torch, so it can run before torch is imported. Reads are advisory:
nothing here can change what is computed, and any failure is silent.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import threading
from pathlib import Path

from .formats import INDEX_NAME
BUDGET = 4 << 30          # at most this many bytes read ahead at start-up (it is stopped
                          # sooner: see stop_read_ahead); a 2 GiB budget left the disk idle
                          # for the last 0.2-0.4 s of a cold `verify` start-up
MEMORY_FRACTION = 0.25    # and at most this share of the available memory
PIECE = 16 << 20          # bytes per read


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's shard files in index order (model order for Hugging Face shards)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, AttributeError):
            return []
        return [folder / n for n in names if isinstance(n, str) and (folder / n).is_file()]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def plan(files: list[list[Path]], budget: int) -> list[tuple[Path, int, int]]:
    """(file, offset, length) reads covering the first ``budget`` bytes, taken in turn
    from each checkpoint's files (``wisca verify`` reads two checkpoints side by side)."""
    streams = []
    for group in files:
        reads = []
        for path in group:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            reads += [(path, off, min(PIECE, size - off)) for off in range(0, size, PIECE)]
        streams.append(reads)
    out, total, i = [], 0, 0
    while total < budget and any(i < len(s) for s in streams):
        for s in streams:
            if i < len(s) and total < budget:
                out.append(s[i])
                total += s[i][2]
        i += 1
    return out


def read_ahead(reads: list[tuple[Path, int, int]], parent: int | None = None,
               stop: threading.Event | None = None) -> int:
    """Read these ranges into the page cache (the bytes themselves are dropped); stops
    early if ``parent`` is no longer our parent or ``stop`` is set. Returns the bytes read."""
    buf = memoryview(mmap.mmap(-1, PIECE))
    fds: dict[Path, int] = {}
    done = 0
    try:
        for path, off, n in reads:
            if (parent is not None and os.getppid() != parent) or (stop is not None and stop.is_set()):
                break
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            done += os.preadv(fds[path], [buf[:n]], off)
    except OSError:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)
    return done


_started: set[Path] = set()
_children: list[int] = []
_stop = threading.Event()
COMMANDS = {"transform": 1, "undo": 1, "inspect": 1, "verify": 2}   # checkpoints each one reads


def warm_start_from_argv(argv: list[str]) -> None:
    """``warm_start`` as early as possible: before the CLI's own imports (typer, rich:
    0.3 s), from the command line as given (the command's first local checkpoint folders,
    options skipped). A hint: the command's own ``warm_start`` then finds it started."""
    try:
        if len(argv) < 2 or argv[1] not in COMMANDS:
            return
        folders = [a for a in argv[2:] if not a.startswith("-") and shard_files(Path(a))]
        warm_start(*folders[:COMMANDS[argv[1]]])
    except Exception:
        pass


def warm_start(*sources: str) -> None:
    """Read the first bytes of local checkpoint folders in a child process; never fails.
    A folder already started in this process is not read again."""
    folders = [Path(s).resolve() for s in sources if s and Path(s).is_dir()]
    if not folders or set(folders) <= _started:
        return
    _started.update(folders)
    try:
        reads = plan([shard_files(f) for f in folders], min(BUDGET, int(_available_memory() * MEMORY_FRACTION)))
    except Exception:   # a hint; the real reads report real errors
        return
    if not reads:
        return
    if threading.active_count() > 1 or not hasattr(os, "fork"):   # forking a threaded process is not safe: read in a thread
        _stop.clear()
        threading.Thread(target=read_ahead, args=(reads, None, _stop), name="wisca-warm-start", daemon=True).start()
        return
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:   # the child: no threads, no torch; read, then leave without any clean-up
        try:
            read_ahead(reads, parent)
        finally:
            os._exit(0)
    _children.append(pid)
    # reap it whenever it ends (the wait lets go of the GIL)
    threading.Thread(target=os.waitpid, args=(pid, 0), name="wisca-warm-start", daemon=True).start()


def stop_read_ahead() -> None:
    """The command's own reads begin: end the start-up read-ahead; what it has read stays
    cached. Its page-cache reads cost up to 3 CPU-seconds per GB here, which is free while
    torch imports on one core but not once the transform and the verifier need both, and
    beside the command's own reads it would be a second stream, which halves this disk's speed."""
    _stop.set()
    while _children:
        try:
            os.kill(_children.pop(), signal.SIGKILL)
        except OSError:   # it has already finished
            pass
