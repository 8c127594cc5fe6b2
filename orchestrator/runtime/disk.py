"""A full disk: one clear error, bytes accounted, and a test hook that makes a folder as small as a tmpfs.

`DiskFull` (a RunError, so a job turns it into exit 1 with one line) names the path a write was for, the
bytes it needed and the bytes free there. `full(e)` says whether an OSError is a full disk (ENOSPC, EDQUOT).

The test hook, for machines where a small tmpfs cannot be mounted (no privileges):
    ORCHESTRATOR_TEST_DISK_LIMIT="DIR=BYTES[;DIR=BYTES...]"
Every write of this project under DIR (the run directory's files through rundir.py, checkpoint files
through storage.py, in the driver and in the device actors, which inherit the environment) first calls
`room(path, nbytes)`, which raises OSError(ENOSPC) when the files under DIR plus the write would exceed
BYTES: a filesystem of that size, whose deleted files free their room again. A refused write writes
nothing, so the hook never tears a file; the real full disk may (rundir.py cleans up after it). Unset, the
hook costs one environment lookup per write.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from orchestrator.errors import RunError

HOOK = "ORCHESTRATOR_TEST_DISK_LIMIT"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(RunError):
    """No space left writing a file: the message names the file, the bytes the write needed and the bytes free
    on its disk, and what to do."""

    def __init__(self, path: str | os.PathLike, needed: int | None, fix: str = ""):
        self.path, self.needed = str(path), needed
        self.free = free_bytes(path)
        free = f"{self.free:,} bytes free there" if self.free is not None else "the free space unknown"
        need = f"writing it needs {needed:,} bytes, " if needed is not None else "writing it failed, "
        super().__init__(f"no space left on the disk of {self.path}: {need}{free}" + (f"; {fix}" if fix else ""))


def full(e: BaseException) -> bool:
    """Is `e` the error of a full disk (or an exhausted quota)?"""
    return isinstance(e, OSError) and e.errno in FULL_ERRNOS


def _limits() -> list[tuple[Path, int]]:
    spec = os.environ.get(HOOK, "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        folder, _, limit = item.rpartition("=")
        out.append((Path(folder).absolute(), int(limit)))
    return out


def _used(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:   # deleted meanwhile
                pass
    return total


def _limit_of(path: str | os.PathLike) -> tuple[Path, int] | None:
    target = Path(path).absolute()
    for folder, limit in _limits():
        if target == folder or folder in target.parents:
            return folder, limit
    return None


def room(path: str | os.PathLike, nbytes: int) -> None:
    """The test hook (see the module docstring): OSError(ENOSPC) when writing `nbytes` more to `path` would
    overflow the limit of the folder it is under; nothing without the hook."""
    if HOOK not in os.environ:
        return
    found = _limit_of(path)
    if found is not None and _used(found[0]) + nbytes > found[1]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the disk of `path` (its nearest existing folder), as the test hook or the filesystem says;
    None when neither can tell."""
    found = _limit_of(path) if HOOK in os.environ else None
    if found is not None:
        return max(0, found[1] - _used(found[0]))
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


__all__ = ["DiskFull", "full", "room", "free_bytes", "HOOK"]
