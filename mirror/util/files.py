"""A small file replaced whole: its readers, and another writer at the same moment, see one
version or the other, never a mix or an empty file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_replacing(path: Path, text: str, *, durable: bool = False) -> None:
    """`text` into a temp file of its own beside `path`, then renamed over it (blocking);
    `durable`: the file, and then its directory, fsynced, so that a power cut leaves it
    whole too (a marker good for seconds need not be)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself on disk
        finally:
            os.close(directory)
