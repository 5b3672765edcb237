"""Keeping the cache within `storage.max_size` and `storage.max_idle`.

Blobs are evicted per digest, least recently read first (a blob's mtime is its last-read
time: `Storage.blob_size` refreshes it on hits). One blob file serves every repository
that references it, so there is nothing per repository to get out of step. A blob being
sent right now is skipped (this process's from `busy`; with workers, any process's by the
shared flock its reader holds on the file); one being downloaded is still in `tmp/` and
never considered. Manifests are small and stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Container, Coroutine, Iterable
from dataclasses import dataclass
from typing import TypeVar

from mirror.observe.metrics import Metrics
from mirror.storage import CacheStore
from mirror.storage.base import LOW_WATER, SCAN_INTERVAL, EvictionResult
from mirror.storage.tally import OwnTally, Tally, Turn, Usage
from mirror.util.filelock import unlink_unread
from mirror.util.settle import in_thread

log = logging.getLogger(__name__)

# Another process's pass runs while the bound is passed: look again this soon (it may die
# mid-pass, and then nobody else would until the next blob lands).
RETRY = 1.0
# An explicit pass (`mirror gc`) waits for the turn, asking this often.
TURN_POLL = 0.1
# Freed beyond a blob's size when the disk had no room for it (an eighth of it, up to
# this): other downloads and the manifests written meanwhile need some too.
ROOM_MARGIN = 64 * 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachedBlob:
    path: str
    digest: str
    size: int
    last_read: float


def scan_blobs(storage: CacheStore) -> list[CachedBlob]:
    """Every cached blob, least recently read first (blocking)."""
    found = []
    for digest, path in storage.walk(storage.blobs):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        found.append(CachedBlob(path, digest, stat.st_size, stat.st_mtime))
    found.sort(key=lambda blob: blob.last_read)
    return found


def choose_victims(
    blobs: list[CachedBlob],
    total: int,
    max_size: int | None,
    max_idle: float | None,
    busy: Container[str],
    now: float,
    low_water: float = LOW_WATER,
) -> list[tuple[CachedBlob, str]]:
    """Which blobs to delete, and why ("idle" or "size"), oldest read first. The newest
    read is not deleted for size when it fits `max_size` alone: a blob between the low
    water mark and the bound would otherwise take every other blob and then itself."""
    over = max_size is not None and total > max_size
    target = int(max_size * low_water) if max_size is not None else 0
    newest = blobs[-1] if blobs and max_size is not None and blobs[-1].size <= max_size else None
    victims = []
    for blob in blobs:
        if blob.digest in busy:
            continue
        if max_idle is not None and now - blob.last_read > max_idle:
            reason = "idle"
        elif over and total > target and blob is not newest:
            reason = "size"
        else:
            continue
        victims.append((blob, reason))
        total -= blob.size
    return victims


class Evictor:
    """Deletes blobs when the cache passes its bounds; runs in the background.

    Each process on the directory runs one (workers: one each); `tally` (storage/tally.py)
    is the count they keep together and whose turn it is, so one pass runs at a time over
    every process's writes: whoever sees the bound passed and gets the turn evicts.
    """

    def __init__(
        self,
        storage: CacheStore,
        metrics: Metrics,
        max_size: int | None,
        max_idle: float | None,
        busy: Callable[[], Iterable[object]],
        tally: Tally | None = None,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._max_size = max_size
        self._max_idle = max_idle
        self._busy = busy
        self._tally = tally or OwnTally()
        self._tally.on_count = self._show
        self._wake = asyncio.Event()
        self._counting: set[asyncio.Task[None]] = set()
        # The thread of the pass under way: its turn is let go only once it has stopped.
        self._evicting: asyncio.Future[EvictionResult] | None = None
        self._making_room: asyncio.Task[None] | None = None
        self._recounting: asyncio.Task[None] | None = None
        metrics.cache_max_size.set(max_size or 0)

    @property
    def enabled(self) -> bool:
        return self._max_size is not None or self._max_idle is not None

    async def start(self, scan: Callable[[], Awaitable[tuple[int, int]]]) -> tuple[int, int]:
        """Count the directory as this process starts (`scan`: its bytes and files), with
        what other processes landed meanwhile (the size gauges from there)."""
        begun = await self._call(self._tally.read)
        size, objects = await scan()
        await self._call(self._tally.recount, begun, size, objects)
        return size, objects

    def added(self, size: int) -> None:
        """A blob of `size` bytes landed: ask for a pass if that passes the bound."""
        self._count(size, blob=True)

    def stored(self, size: int) -> None:
        """A manifest of `size` bytes was written (counted in the size, not the bound)."""
        self._count(size, blob=False)

    def _count(self, size: int, blob: bool) -> None:
        if not self._tally.blocks:
            self._counted(self._tally.add(size, blob))
            return
        task = asyncio.create_task(self._count_shared(size, blob))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _count_shared(self, size: int, blob: bool) -> None:
        try:
            usage = await asyncio.to_thread(self._tally.add, size, blob)
        except OSError as exc:  # the next pass counts it
            log.warning("cannot count a new file in the eviction tally: %s", exc)
            return
        self._counted(usage)

    def _counted(self, usage: Usage) -> None:
        if self._over(usage):
            self._wake.set()

    def _show(self, usage: Usage) -> None:
        """The size gauges from the count, each time it is read or changed (with workers:
        under the tally's lock, so the most recent value is the latest count)."""
        self._metrics.cache_size.set(usage.size)
        self._metrics.cache_objects.set(usage.objects)

    def _over(self, usage: Usage) -> bool:
        return self._max_size is not None and usage.blobs > self._max_size

    async def run(self) -> None:
        """A pass now if one is due, then on every poke or when the next is due (every
        SCAN_INTERVAL across the processes), until cancelled."""
        while True:
            try:
                pause = await self.pass_if_due()
            except OSError as exc:
                log.warning("eviction pass failed: %s", exc)
                pause = SCAN_INTERVAL
            if pause > 0:
                await _wait_or_timeout(self._wake, pause)
                self._wake.clear()

    def recount_soon(self) -> None:
        """The directory was emptied under the mirror: a pass on the next turn counts what
        it holds again (the size gauges kept the old count until the next pass, for good
        in a cache with no bound)."""
        if self._recounting is None or self._recounting.done():
            self._recounting = self._in_background(self._recount())

    async def _recount(self) -> None:
        try:
            await self.evict()  # a pass counts the directory as it scans it
        except OSError as exc:
            log.warning("cannot count the cache directory again: %s", exc)

    def make_room(self, size: int) -> None:
        """A blob of `size` bytes, within the bound, found no room on the disk (the disk is
        smaller than the bound allows, or holds other things): a pass in the background
        frees what it lacks, least recently read first, so that the next pull keeps it.
        One at a time; the request that found no room is relayed meanwhile."""
        if self._max_size is None:  # unbounded: what the operator keeps, nothing goes
            return
        if self._making_room is None or self._making_room.done():
            self._making_room = self._in_background(self._make_room(size))

    def _in_background(self, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """A task `close` waits for (after cancelling it)."""
        task = asyncio.create_task(work)
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)
        return task

    async def _make_room(self, size: int) -> None:
        try:
            free, _ = await self._storage.disk_space()
            lacking = size + min(ROOM_MARGIN, size // 8) - free
            if lacking <= 0:
                return
            turn = await self._wait_for_turn()
            try:
                start = await self._call(self._tally.read)
                if start.blobs >= lacking:  # else the disk is taken by more than blobs
                    await self._pass(start, start.blobs - lacking, exact=True)
            finally:
                await self._release(turn)
        except OSError as exc:
            log.warning("cannot make room for a blob of %d bytes: %s", size, exc)

    async def close(self) -> None:
        """Let the counts under way finish; a pass making room is stopped."""
        for task in (self._making_room, self._recounting):
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._counting, return_exceptions=True)

    async def pass_if_due(self) -> float:
        """One pass if it is this process's turn and one is due; the seconds until to look
        again (0: at once, blobs landed meanwhile and passed the bound again)."""
        turn = await self._take_turn()
        if turn is None:
            # Another process's pass: it looks at what lands meanwhile, but it may die
            # mid-pass (the kernel frees its turn), so look again soon while over.
            usage = await self._call(self._tally.read)
            return RETRY if self._over(usage) else max(RETRY, self._until_due(usage))
        try:
            start = await self._call(self._tally.read)
            if not (self._over(start) or self._until_due(start) == 0):
                return self._until_due(start)
            await self._pass(start, self._max_size)
        finally:
            await self._release(turn)
        # Read after the turn is let go: what landed while another process found the turn
        # taken is seen here, by the pass it counted on.
        after = await self._call(self._tally.read)
        if self._over(after) and after.landed != start.landed:
            return 0
        return self._until_due(after)

    async def evict(self, max_size: int | None = None) -> EvictionResult:
        """One pass now, on this process's turn: delete what the bounds (or an explicit
        `max_size`) call for."""
        turn = await self._wait_for_turn()
        try:
            start = await self._call(self._tally.read)
            bound = max_size if max_size is not None else self._max_size
            return await self._pass(start, bound)
        finally:
            await self._release(turn)

    async def _pass(self, start: Usage, bound: int | None, exact: bool = False) -> EvictionResult:
        """Evict to `bound`: to LOW_WATER of it (room for the next blobs), or to the bound
        itself when `exact` (making room for one blob)."""
        busy = {str(digest) for digest in self._busy()}
        self._metrics.eviction_passes.inc()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        low_water = 1.0 if exact else LOW_WATER
        self._evicting = loop.run_in_executor(None, self._evict_sync, bound, busy, stop, low_water)
        try:
            result = await asyncio.shield(self._evicting)
        except asyncio.CancelledError:
            stop.set()  # before its next file: no other process's pass is to overlap it
            raise
        size, count = await self._storage.usage()
        await self._call(self._tally.settle, start, result.remaining, size, count)
        return result

    def _until_due(self, usage: Usage) -> float:
        """Seconds until a periodic pass is due (a clock set back waits one interval)."""
        left = usage.passed + SCAN_INTERVAL - time.time()
        return min(max(left, 0.0), SCAN_INTERVAL)

    async def _wait_for_turn(self) -> Turn:
        while (turn := await self._take_turn()) is None:
            await asyncio.sleep(TURN_POLL)
        return turn

    async def _take_turn(self) -> Turn | None:
        if not self._tally.blocks:
            return self._tally.take_turn()
        taking = asyncio.get_running_loop().run_in_executor(None, self._tally.take_turn)
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(_release_taken)  # else held until the process ends
            raise

    async def _release(self, turn: Turn) -> None:
        evicting = self._evicting
        if evicting is not None and not evicting.done():  # cancelled mid-pass
            evicting.add_done_callback(lambda _: turn.release())
            return
        if self._tally.blocks:
            await in_thread(turn.release)  # to its end even if this task is cancelled
        else:
            turn.release()

    async def _call(self, call: Callable[..., T], *args: object) -> T:
        """A tally call: in a thread when it waits on file locks."""
        if self._tally.blocks:
            return await asyncio.to_thread(call, *args)
        return call(*args)

    def _evict_sync(
        self, max_size: int | None, busy: set[str], stop: threading.Event, low_water: float
    ) -> EvictionResult:
        blobs = scan_blobs(self._storage)
        total = sum(blob.size for blob in blobs)
        now = time.time()
        evicted = freed = 0
        while True:
            victims = choose_victims(blobs, total, max_size, self._max_idle, busy, now, low_water)
            gone: set[str] = set()
            read_elsewhere = set()
            for blob, reason in victims:
                if stop.is_set():
                    return EvictionResult(evicted, freed, total)
                removed = unlink_unread(blob.path)
                if removed is False:  # a reader holds it (another worker's, with workers)
                    read_elsewhere.add(blob.digest)
                    continue
                gone.add(blob.path)
                total -= blob.size
                if removed:
                    evicted += 1
                    freed += blob.size
                    self._metrics.evictions.labels(reason).inc()
                    self._metrics.evicted_bytes.inc(blob.size)
            if not read_elsewhere:
                break
            # The victims after a skipped one were chosen as if it went: choose again.
            busy |= read_elsewhere
            blobs = [blob for blob in blobs if blob.path not in gone]
        if evicted:
            log.info("evicted %d blobs, %d bytes", evicted, freed)
        return EvictionResult(evicted, freed, total)


def _release_taken(taking: asyncio.Future[Turn | None]) -> None:
    if taking.cancelled() or taking.exception() is not None:
        return
    turn = taking.result()
    if turn is not None:
        turn.release()  # a close: brief enough for a callback


async def _wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event`, at most `seconds`. Not `wait_for`: on Python 3.11 it swallows a
    cancellation that lands as the event is set, and shutdown then waits on a pass that
    never ends."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
