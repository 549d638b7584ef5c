"""Get the disk going early: read-ahead hints for a checkpoint's first bytes.

Importing torch takes a second or two of CPU; a checkpoint that is not in the page cache
takes about as long to start arriving from disk. ``warm_start`` asks the kernel (with
``posix_fadvise(WILLNEED)``, which only queues reads) to fetch the first shards' leading
bytes while Python imports, so the two overlap. During the run the reader hints the
stage after the one it is reading (``Checkpoint.advise``). Hints are bounded (a fraction
of available memory) and advisory: nothing here can change what is computed.

Deliberately free of torch, so it can run before torch is imported.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .formats import INDEX_NAME
BUDGET = 1 << 30          # at most this many bytes hinted at start-up
MEMORY_FRACTION = 0.25    # and at most this share of the available memory


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


def advise_files(files: list[Path], budget: int) -> int:
    """Hint the first ``budget`` bytes of ``files``, in order; returns the bytes hinted."""
    done = 0
    for path in files:
        if done >= budget:
            break
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            n = min(os.fstat(fd).st_size, budget - done)
            os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
            done += n
        except (OSError, AttributeError):   # no fadvise on this platform: nothing to gain
            pass
        finally:
            os.close(fd)
    return done


def warm_start(*sources: str) -> None:
    """Start read-ahead of local checkpoint folders in a background thread; never fails."""
    folders = [Path(s) for s in sources if s and Path(s).is_dir()]
    if not folders:
        return
    budget = min(BUDGET, int(_available_memory() * MEMORY_FRACTION)) // len(folders)

    def run() -> None:
        for folder in folders:
            try:
                advise_files(shard_files(folder), budget)
            except Exception:   # a hint; the real reads report real errors
                pass

    threading.Thread(target=run, name="wisca-warm-start", daemon=True).start()
