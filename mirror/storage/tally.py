"""The cache directory's size as eviction counts it, and whose turn it is to run a pass.

A pass scans the directory and sets the count; each blob that lands adds to it, so a new
blob costs an addition, not a walk. Alone (`OwnTally`), both live in this process. With
workers (`SharedTally`), every process on the directory adds to one count and passes take
turns, under `eviction/` in the cache directory:

    eviction/tally   "<blobs> <landed> <size> <objects> <grown> <arrived> <passed>", each
                     field 20 wide, read and rewritten under an exclusive flock held for
                     just that
    eviction/turn    a pass holds an exclusive flock on it while it runs: one pass at a
                     time per directory; the kernel frees a killed holder's at once

A tally that does not parse counts as empty and never passed: the next pass rebuilds it.

A scan (a process's start, a pass) sets the count from what it found, plus what other
processes added while it scanned: `grown` and `arrived` only grow, so the scan reads them
before and after. Without that, a worker that started while another landed a blob wrote
its scan over the other's addition, and the size gauge stayed short by that blob. A file
that landed while the scan ran and that the scan saw is counted twice, until the next pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mirror.util.filelock import lock_within, try_lock

_FIELD = 20
# A tally's lock is held for a read and a write. A process stopped (not killed) while it
# holds it must not stall the others: they wait this long, then skip their update (the
# next pass corrects the count).
LOCK_PATIENCE = 1.0
_LOCK_POLL = 0.001


@dataclass(frozen=True, slots=True)
class Usage:
    """The count as last written."""

    blobs: int = 0  # bytes of blobs: what `storage.max_size` bounds
    landed: int = 0  # bytes of blobs landed since the count began (only grows)
    size: int = 0  # bytes of blobs and manifests (mirror_cache_size_bytes)
    objects: int = 0  # their files (mirror_cache_objects)
    grown: int = 0  # bytes of blobs and manifests landed since the count began (only grows)
    arrived: int = 0  # their files (only grows)
    passed: float = 0.0  # when the last pass ended (wall clock); 0: never

    def added(self, size: int, blob: bool) -> Usage:
        """A file of `size` bytes landed: a blob, or a manifest (outside the bound)."""
        counted = replace(
            self,
            size=self.size + size,
            objects=self.objects + 1,
            grown=self.grown + size,
            arrived=self.arrived + 1,
        )
        if not blob:
            return counted
        return replace(counted, blobs=self.blobs + size, landed=self.landed + size)

    def recounted(self, start: Usage, size: int, objects: int) -> Usage:
        """A process's start found the directory this large (all told) in a scan that
        began at `start`: what landed meanwhile is counted on top."""
        return replace(self, **self._scanned(start, size, objects))

    def settled(self, start: Usage, blobs: int, size: int, objects: int) -> Usage:
        """After a pass that began at `start` and left `blobs` bytes of blobs (`size`,
        `objects` all told). Blobs that landed while it scanned may have been missed by
        its scan: they are counted on top (twice at worst: an early extra pass)."""
        during = self.landed - start.landed
        return replace(
            self, blobs=blobs + during, passed=time.time(), **self._scanned(start, size, objects)
        )

    def _scanned(self, start: Usage, size: int, objects: int) -> dict[str, int]:
        return {
            "size": size + self.grown - start.grown,
            "objects": objects + self.arrived - start.arrived,
        }


class Turn(Protocol):
    """The right to run a pass, until released."""

    def release(self) -> None: ...


class Tally(Protocol):
    """The count and the turns; `blocks`: the calls wait on file locks (run them in a
    thread). `on_count` is told the count each time it is read or changed (with workers,
    in the caller's thread, under the tally's lock: in the order of the changes)."""

    on_count: Callable[[Usage], None] | None

    @property
    def blocks(self) -> bool: ...

    def read(self) -> Usage: ...

    def add(self, size: int, blob: bool) -> Usage: ...

    def recount(self, start: Usage, size: int, objects: int) -> Usage: ...

    def settle(self, start: Usage, blobs: int, size: int, objects: int) -> Usage: ...

    def take_turn(self) -> Turn | None:
        """The turn if no pass runs now, else None (never waits)."""


class OwnTally:
    """This process alone on its directory: the count and the turn are in memory."""

    blocks = False

    def __init__(self) -> None:
        self.on_count: Callable[[Usage], None] | None = None
        self._usage = Usage()
        self._turn: _OwnTurn | None = None

    def read(self) -> Usage:
        return self._told(self._usage)

    def add(self, size: int, blob: bool) -> Usage:
        return self._told(self._usage.added(size, blob))

    def recount(self, start: Usage, size: int, objects: int) -> Usage:
        return self._told(self._usage.recounted(start, size, objects))

    def settle(self, start: Usage, blobs: int, size: int, objects: int) -> Usage:
        return self._told(self._usage.settled(start, blobs, size, objects))

    def _told(self, usage: Usage) -> Usage:
        self._usage = usage
        if self.on_count is not None:
            self.on_count(usage)
        return usage

    def take_turn(self) -> Turn | None:
        if self._turn is not None:
            return None
        self._turn = _OwnTurn(self)
        return self._turn


class _OwnTurn:
    def __init__(self, tally: OwnTally) -> None:
        self._tally: OwnTally | None = tally

    def release(self) -> None:
        tally, self._tally = self._tally, None
        if tally is not None:
            tally._turn = None


class SharedTally:
    """The processes on one cache directory (workers): files under `directory`."""

    blocks = True

    def __init__(self, directory: Path) -> None:
        self.on_count: Callable[[Usage], None] | None = None
        self.directory = directory
        self._tally = directory / "tally"
        self._turn = directory / "turn"

    def read(self) -> Usage:
        return self._update(None)

    def add(self, size: int, blob: bool) -> Usage:
        return self._update(lambda usage: usage.added(size, blob))

    def recount(self, start: Usage, size: int, objects: int) -> Usage:
        return self._update(lambda usage: usage.recounted(start, size, objects))

    def settle(self, start: Usage, blobs: int, size: int, objects: int) -> Usage:
        return self._update(lambda usage: usage.settled(start, blobs, size, objects))

    def take_turn(self) -> Turn | None:
        """The turn to run a pass, or None: another process runs one, or the directory takes
        no writes (a read-only disk: nothing to evict there, and a pass could not)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._turn, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            if not try_lock(fd):
                os.close(fd)
                return None
            # Who holds it, for whoever looks (the file is never unlinked: no race there).
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid-{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return _FileTurn(fd)

    def _update(self, change: Callable[[Usage], Usage] | None) -> Usage:
        """The count, changed by `change` under the tally's lock (blocking). On a directory
        that takes no writes (read-only, full) the count as it is, unchanged: a worker
        starting or restarted there must serve what the cache holds, as a single process
        does, not die at its first count (the supervisor then gave up on the host)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._tally, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return _read_as_is(self._tally)
        try:
            locked = lock_within(fd, LOCK_PATIENCE, _LOCK_POLL)
            usage = _parse(os.pread(fd, 256, 0))
            if not locked:
                return usage
            if change is not None:
                usage = change(usage)
                line = _format(usage)
                os.pwrite(fd, line, 0)
                # A longer line another release wrote must not leave its tail behind.
                os.ftruncate(fd, len(line))
            if self.on_count is not None:
                self.on_count(usage)
            return usage
        finally:
            os.close(fd)


class _FileTurn:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with it


def _read_as_is(path: Path) -> Usage:
    try:
        with open(path, "rb") as file:
            return _parse(file.read(256))
    except OSError:
        return Usage()


def _format(usage: Usage) -> bytes:
    fields = (usage.blobs, usage.landed, usage.size, usage.objects, usage.grown, usage.arrived)
    line = " ".join(f"{value:{_FIELD}d}" for value in fields)
    return f"{line} {usage.passed:{_FIELD}.3f}\n".encode()


def _parse(raw: bytes) -> Usage:
    """The first line's fields in their order; fields past them (a later release's) are
    left alone, so a rollback reads the count rather than zeros, and passes forever."""
    try:
        values = raw.split(b"\n", 1)[0].decode().split()
        blobs, landed, size, objects, grown, arrived = (int(value) for value in values[:6])
        return Usage(blobs, landed, size, objects, grown, arrived, float(values[6]))
    except (ValueError, IndexError):
        return Usage()
