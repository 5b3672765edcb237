"""Exclusive file locks that several processes of one host take on a path (flock).

A holder unlinks its file before it unlocks it (by closing), so that a process which opened
the path before the unlink and then got the lock sees, by `same_file`, that its file is no
longer the one at the path, and opens it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def try_lock(fd: int) -> bool:
    """Take the exclusive lock of `fd` if nobody holds it (non-blocking)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file `fd` is open on."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


def release(fd: int, path: Path) -> None:
    """Unlink the lock file (if it is still ours), then unlock it by closing (blocking)."""
    with contextlib.suppress(OSError):
        if same_file(fd, path):
            path.unlink()
    os.close(fd)
