"""File locks that several processes of one host take on a path (flock).

A holder unlinks its file before it unlocks it (by closing), so that a process which opened
the path before the unlink and then got the lock sees, by `same_file`, that its file is no
longer the one at the path, and opens it again.

A reader of a cached blob may hold a shared lock on it while it sends it; a remover then
finds the exclusive lock taken and leaves the file (`unlink_unread`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


def try_lock(fd: int) -> bool:
    """Take the exclusive lock of `fd` if nobody holds it (non-blocking)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_within(fd: int, patience: float, poll: float = 0.001) -> bool:
    """Take the exclusive lock of `fd`, trying for `patience` seconds at most (blocking): a
    holder that keeps it longer (a process stopped while it holds it) is not waited for."""
    deadline = time.monotonic() + patience
    while not try_lock(fd):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def try_lock_shared(fd: int) -> bool:
    """Take a shared lock of `fd` unless an exclusive one is held (non-blocking)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlink_unread(path: str) -> bool | None:
    """Unlink `path` unless some process holds a lock on it (a reader's shared one): True
    when unlinked, False when left for its reader, None when it was gone (blocking)."""
    try:
        fd = _open_to_lock(path)
    except FileNotFoundError:
        return None
    try:
        if not try_lock(fd):
            return False
        # Held until the close: a reader that opened the file meanwhile gets its shared
        # lock only after the unlink, on a file no longer in the cache (it sends it whole).
        os.unlink(path)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)
    return True


def _open_to_lock(path: str) -> int:
    # For writing where allowed: NFS emulates flock with POSIX locks, whose exclusive kind
    # needs a descriptor open for writing.
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


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
