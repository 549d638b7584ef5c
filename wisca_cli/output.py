"""Output folders that appear whole or not at all.

Everything is written to a temporary folder beside the target and renamed into place
only at the end. With ``overwrite`` the old target survives until the new one is ready.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
from pathlib import Path

from .errors import WiscaError

TMP_MARK = ".wisca-tmp-"
OLD_MARK = ".wisca-old-"


def check_target(src: Path, dst: Path, overwrite: bool) -> Path:
    """Refuse targets that would clobber the source or an existing folder."""
    dst = Path(os.path.abspath(dst))
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise WiscaError(f"{dst}: the output must not be the source folder or inside it")
    if dst_real in src_real.parents:
        raise WiscaError(f"{dst}: the output must not contain the source folder")
    if not dst.parent.is_dir():
        raise WiscaError(f"{dst.parent}: output parent folder does not exist")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise WiscaError(f"{dst}: already exists (pass `overwrite` to replace it)", fields=("overwrite",))
        if not dst.is_dir():
            raise WiscaError(f"{dst}: exists and is not a folder; not replacing it")
    return dst


# Temporary folders of this process that are neither committed nor removed yet. A signal can
# land between a folder's creation and the ``with`` block (or ``try``) that would remove it;
# the CLI's signal path calls ``remove_staged`` so that nothing is left even then.
_STAGED: set[Path] = set()
# Outputs this process has moved into place: a signal after the rename (it waits while the
# rename runs) must not be reported as "no output written".
COMMITTED: list[Path] = []


def staged_dir(parent: Path, name: str) -> Path:
    """Create ``parent/.<name>.wisca-tmp-<pid>-<random>``, registered before it exists."""
    tmp = parent / f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"
    _STAGED.add(tmp)
    try:
        tmp.mkdir()
    except OSError:   # not created: nothing of ours to remove
        _STAGED.discard(tmp)
        raise
    # A signal raised as mkdir returns (the folder exists) leaves it registered, so the
    # signal path removes it.
    return tmp


def discard_staged(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    _STAGED.discard(tmp)


def remove_staged() -> None:
    """Remove every temporary folder still registered (a run ended by a signal)."""
    for tmp in list(_STAGED):
        discard_staged(tmp)


class StagedOutput:
    """``with StagedOutput(dst) as out: ... out.commit()``; without commit nothing remains."""

    def __init__(self, dst: Path, overwrite: bool = False):
        self.dst, self.overwrite = dst, overwrite
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> "StagedOutput":
        try:
            self.tmp = staged_dir(self.dst.parent, self.dst.name)
        except OSError as e:
            raise WiscaError(f"{self.dst.parent}: cannot create the output folder here: {e.strerror}") from e
        return self

    def commit(self) -> None:
        """Move the finished folder into place (atomic rename); signals wait until it is done."""
        _fsync_dir(self.tmp)
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._swap()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _swap(self) -> None:
        old = None
        if self.overwrite and self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}{OLD_MARK}{os.getpid()}-{secrets.token_hex(3)}"
            os.rename(self.dst, old)
        try:
            os.rename(self.tmp, self.dst)
        except OSError as e:
            if old is not None:
                os.rename(old, self.dst)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise WiscaError(f"{self.dst}: appeared while wisca was running (another run?); "
                                 f"left it as it is") from e
            raise WiscaError(f"{self.dst}: cannot move the output into place: {e.strerror}") from e
        _fsync_dir(self.dst.parent)
        self.committed = True
        COMMITTED.append(self.dst)
        _STAGED.discard(self.tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self.committed and self.tmp is not None:
            discard_staged(self.tmp)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_other_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy every file of src not in ``skip`` (config, tokenizer, ...), following symlinks."""
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        target = dst / entry.name
        try:
            if entry.is_dir():
                shutil.copytree(entry, target, symlinks=False)
            elif entry.is_file():
                shutil.copyfile(entry, target)
                shutil.copymode(entry, target)
            else:
                continue
        except OSError as e:
            raise WiscaError(f"{entry}: cannot copy to the output: {e.strerror or e}") from e
        copied.append(entry.name)
    return copied
