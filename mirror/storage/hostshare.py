"""The bucket's chores among the workers of one host (`workers: N` without `cluster:`), told
apart by file locks in the cache directory they share (storage/sharing.py asks).

- One eviction pass at a time: a pass holds `bucket-chores.lock` exclusively; a worker
  that finds it held skips its pass (the holder's covers the bucket), as replicas do with
  their lease (cluster/bucketshare.py).
- A worker streaming an object from the bucket holds a shared lock on
  `bucket-reads/<algorithm>-<hex>` until `evict_grace` after its last stream of it ends;
  a pass leaves every object whose file is locked (the kernel drops a dead worker's).
- Another worker's live upload is told by its download's claim (tiered.py), so none is
  known here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from mirror.storage.sharing import Alone
from mirror.util.filelock import release, same_file, try_lock
from mirror.util.settle import in_thread

log = logging.getLogger(__name__)

CHORES_LOCK = "bucket-chores.lock"
READS = "bucket-reads"
# Objects whose read lock is kept past their last stream (within their grace), at most:
# past it the oldest is let go early. A descriptor each, out of the 1,024 the server keeps
# beyond its connections (web/server.py) for files, upstream and Redis connections.
MAX_IN_GRACE = 256


@dataclass(slots=True)
class _Read:
    streams: int = 0
    fd: int = -1  # until the lock is taken (or if it could not be)
    grace: asyncio.TimerHandle | None = None
    locking: asyncio.Future[int] | None = None


class HostShare(Alone):
    """`BucketSharing` among the workers on one cache directory (`root`): uploads as
    `Alone` has them, the rest by file locks."""

    def __init__(self, root: Path) -> None:
        self._chores = root / CHORES_LOCK
        self._reads = root / READS
        self._held: dict[str, _Read] = {}

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        try:
            fd = await asyncio.to_thread(self._take_chores)
        except OSError as exc:  # this turn is skipped, as when another worker holds it
            log.warning("bucket chores skipped: %s cannot be locked: %s", self._chores, exc)
            fd = None
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            await in_thread(functools.partial(os.close, fd))  # to its end, cancelled too

    async def begin_read(self, digest: str) -> None:
        read = self._held.get(digest)
        if read is None:
            # The lock is the entry's, not the first stream's: taken (or let go) whichever
            # of its streams is cancelled meanwhile.
            read = self._held[digest] = _Read()
            read.locking = asyncio.get_running_loop().run_in_executor(
                None, _lock_read, self._path(digest)
            )
            read.locking.add_done_callback(functools.partial(self._lock_taken, digest, read))
        # Counted before any await: a stream cancelled from here ends (`end_read`) what it
        # began, never another stream's count.
        read.streams += 1
        if read.grace is not None:
            read.grace.cancel()
            read.grace = None
        if read.locking is not None and not read.locking.done():
            await asyncio.wait([read.locking])  # cancelled, this leaves the lock to land

    def _lock_taken(self, digest: str, read: _Read, locking: asyncio.Future[int]) -> None:
        if locking.cancelled():
            return
        error = locking.exception()
        if error is not None:  # its streams go on unmarked: never failed for a mark
            log.warning("bucket read of %s not marked: %s", digest, error)
            if self._held.get(digest) is read:  # the next stream tries the lock again
                del self._held[digest]
                if read.grace is not None:
                    read.grace.cancel()
            return
        if self._held.get(digest) is read:
            read.fd = locking.result()
            return
        # Its streams ended while the lock was taken.
        with contextlib.suppress(RuntimeError):  # the loop is closing: the process ends
            asyncio.get_running_loop().run_in_executor(
                None, _unlock, locking.result(), self._path(digest)
            )

    async def end_read(self, digest: str, grace: float) -> None:
        read = self._held.get(digest)
        if read is None:
            return
        read.streams -= 1
        if read.streams > 0:
            return
        loop = asyncio.get_running_loop()
        read.grace = loop.call_later(grace, self._let_go, digest, read)
        idle = [name for name, held in self._held.items() if held.streams == 0]
        for name in idle[: max(0, len(idle) - MAX_IN_GRACE)]:  # the oldest first
            self._let_go(name, self._held[name])

    async def read_elsewhere(self, digest: str) -> bool:
        """Is the object's read file locked (by any worker, this one's streams included:
        the caller counts those already)?"""
        try:
            return await asyncio.to_thread(_locked, self._path(digest))
        except OSError:  # cannot tell: left, as replicas leave it when Redis cannot tell
            return True

    async def close(self) -> None:
        for digest, read in list(self._held.items()):
            if read.grace is not None:
                read.grace.cancel()
            del self._held[digest]
            await asyncio.to_thread(_unlock, read.fd, self._path(digest))

    def _path(self, digest: str) -> Path:
        return self._reads / digest.replace(":", "-")

    def _let_go(self, digest: str, read: _Read) -> None:
        if self._held.get(digest) is not read or read.streams:
            return
        del self._held[digest]
        if read.grace is not None:
            read.grace.cancel()
        asyncio.get_running_loop().run_in_executor(None, _unlock, read.fd, self._path(digest))

    def _take_chores(self) -> int | None:
        """The chores lock, held, or None when another worker holds it (blocking)."""
        fd = os.open(self._chores, os.O_RDWR | os.O_CREAT, 0o600)
        if try_lock(fd):
            return fd
        os.close(fd)
        return None


def _lock_read(path: Path) -> int:
    """A shared lock on the read file at `path`, made if missing (blocking). A file a check
    unlinked between the open and the lock is opened again: the lock must be on the file
    the next check finds."""
    path.parent.mkdir(exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # a check holds it exclusively for an instant only
        if same_file(fd, path):
            return fd
        os.close(fd)


def _locked(path: Path) -> bool:
    """Does a worker hold the read file at `path`? A file nobody holds is removed (blocking)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    if not try_lock(fd):
        os.close(fd)
        return True
    release(fd, path)
    return False


def _unlock(fd: int, path: Path) -> None:
    """Let a read file go: removed when no other worker holds it too (blocking). `fd` -1:
    the lock was never taken."""
    with contextlib.suppress(OSError):  # run unawaited: nothing to raise to
        if fd >= 0:
            os.close(fd)
        _locked(path)
