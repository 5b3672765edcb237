"""Leases among the processes of one host (workers on one cache directory): file locks.

A lease is an exclusive `flock` on `<dir>/<sha256 of its name>`, whose content names the
holder. The kernel releases a dead process's locks at once, so a lease needs no expiry nor
renewal: a waiter takes over the moment its holder dies. The holder unlinks the file before
it unlocks; whoever locks a file checks that its path still leads to it (else it locked
a file a release unlinked, and starts again), so two processes never hold one name.

A failure marker (`cluster/shared.py`) is `<file>.failed`, "<holder> <error class>", good
for one `ttl` after it was written. Markers past it, and the files of holders that died, are
swept at start and at most once per SWEEP_EVERY as markers are written: names come from
clients (a tag asked for that does not exist leaves a marker), so they must not pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.cluster.lease import Held
from mirror.util.filelock import release, same_file, unlink_unread
from mirror.util.files import write_replacing
from mirror.util.settle import in_thread

# Waiters poll their holder's result at this pace at most (cluster/shared.py); the lease
# itself never runs out. Also how long a failure marker stays good.
LOCAL_TTL = 5.0
# The lock directory is swept of what no process uses at most this often (seconds).
SWEEP_EVERY = 60.0


class LocalLease:
    """A lease this process holds: an open, locked file."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[LocalLease]:
        """Held while the block runs (the lock cannot lapse); released after it."""
        try:
            yield self
        finally:
            # In a thread, awaited to its end even if this task is cancelled (a queued
            # thread call that is cancelled would never run: the lock held for good).
            await in_thread(self.release)

    def release(self) -> None:
        """Unlink the file, then unlock it by closing (blocking; idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            release(fd, self.path)


class LocalLeases:
    """`LeaseSource` over file locks in `directory`, for the processes of one host."""

    def __init__(self, directory: Path, ttl: float = LOCAL_TTL) -> None:
        self._dir = directory
        self._ttl = ttl
        self._owner = f"pid-{os.getpid()}"
        self._swept_at = -SWEEP_EVERY

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def ttl(self) -> float:
        return self._ttl

    def path(self, name: str) -> Path:
        # Hashed: names hold slashes and colons, and may be longer than a file name.
        return self._dir / hashlib.sha256(name.encode()).hexdigest()

    async def acquire(self, name: str) -> LocalLease | Held | None:
        """Ours now, or Held by another process; None when the lock directory fails."""
        try:
            return await asyncio.to_thread(self._acquire_sync, self.path(name))
        except OSError:
            return None  # as with Redis down: work alone

    def _acquire_sync(self, path: Path) -> LocalLease | Held:
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                return Held(holder or "another process")
            except BaseException:
                os.close(fd)
                raise
            if not same_file(fd, path):  # a release unlinked it meanwhile: again
                os.close(fd)
                continue
            # The holder's name is for waiters' logs and markers only: a disk that refuses it
            # (full, read-only) must not leave the lock held by a descriptor nobody closes.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._owner.encode(), 0)
            return LocalLease(fd, path)

    async def holder(self, name: str) -> str | None:
        try:
            return await asyncio.to_thread(self._holder_sync, self.path(name))
        except OSError:
            return None

    @staticmethod
    def _holder_sync(path: Path) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or "another process"
        finally:
            os.close(fd)  # a shared lock taken is dropped with it
        return None

    async def mark_failed(self, name: str, error: str) -> None:
        marker = _marker(self.path(name))
        with contextlib.suppress(OSError):
            await asyncio.to_thread(_write_marker, marker, f"{self._owner} {error}")
        if time.monotonic() - self._swept_at >= SWEEP_EVERY:
            await self.sweep()

    async def sweep(self) -> int:
        """Remove the markers past their `ttl` and the lease files no process holds; the
        count removed."""
        self._swept_at = time.monotonic()
        try:
            return await asyncio.to_thread(self._sweep_sync)
        except OSError:
            return 0

    def _sweep_sync(self) -> int:
        removed = 0
        stale = time.time() - self._ttl
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if "." in entry.name:  # a marker, or one a writer left half made
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < stale:
                        os.unlink(entry.path)
                        removed += 1
            elif unlink_unread(entry.path):  # a holder unlinks its own: this one's died
                removed += 1
        return removed

    async def failure(self, name: str) -> tuple[str, str] | None:
        try:
            return await asyncio.to_thread(self._failure_sync, _marker(self.path(name)))
        except OSError:
            return None

    def _failure_sync(self, marker: Path) -> tuple[str, str] | None:
        try:
            if time.time() - marker.stat().st_mtime > self._ttl:
                marker.unlink(missing_ok=True)
                return None
            owner, _, error = marker.read_text().partition(" ")
        except FileNotFoundError:
            return None
        return owner, error


def _read(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".failed")


def _write_marker(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_replacing(path, text)
