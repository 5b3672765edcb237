"""A small file replaced whole: its readers, and another writer at the same moment, see one
version or the other, never a mix or an empty file."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from pathlib import Path


def write_replacing(path: Path, text: str, *, durable: bool = False) -> os.stat_result:
    """`text` into a temp file of its own beside `path`, then renamed over it (blocking);
    `durable`: the file, and then its directory, fsynced, so that a power cut leaves it
    whole too (a marker good for seconds need not be). The file's status as written, to
    tell whether the file at `path` is still this one."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            if durable:
                os.fsync(out.fileno())
            written = os.fstat(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        sync_directory(path.parent)  # the rename itself on disk
    return written


def sync_directory(path: Path) -> None:
    """fsync the directory `path` (blocking): the names made or renamed in it are on disk
    once this returns, not only the files' bytes."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temps(path: Path, older_than: float) -> int:
    """Remove the temp files `write_replacing` left beside `path` (a process killed while
    it wrote) that are older than `older_than` seconds; how many (blocking)."""
    removed = 0
    stale = time.time() - older_than
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if temp.stat().st_mtime < stale:
                temp.unlink()
                removed += 1
    return removed
