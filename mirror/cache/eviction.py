"""Keeping the cache within `storage.max_size` and `storage.max_idle`.

Blobs are evicted per digest, least recently read first (a blob's mtime is its last-read
time: `Storage.blob_size` refreshes it on hits). One blob file serves every repository
that references it, so there is nothing per repository to get out of step. A blob being
sent right now is skipped; one being downloaded is still in `tmp/` and never considered.
Manifests are small and stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from mirror.observe.metrics import Metrics
from mirror.storage import CacheStore
from mirror.storage.base import LOW_WATER, SCAN_INTERVAL, EvictionResult

log = logging.getLogger(__name__)


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
) -> list[tuple[CachedBlob, str]]:
    """Which blobs to delete, and why ("idle" or "size"), oldest read first."""
    over = max_size is not None and total > max_size
    target = int(max_size * LOW_WATER) if max_size is not None else 0
    victims = []
    for blob in blobs:
        if blob.digest in busy:
            continue
        if max_idle is not None and now - blob.last_read > max_idle:
            reason = "idle"
        elif over and total > target:
            reason = "size"
        else:
            continue
        victims.append((blob, reason))
        total -= blob.size
    return victims


class Evictor:
    """Deletes blobs when the cache passes its bounds; runs in the background."""

    def __init__(
        self,
        storage: CacheStore,
        metrics: Metrics,
        max_size: int | None,
        max_idle: float | None,
        busy: Callable[[], Iterable[object]],
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._max_size = max_size
        self._max_idle = max_idle
        self._busy = busy
        self._wake = asyncio.Event()
        # Bytes of blobs, counted up as blobs land and reset by each pass's scan, so a
        # new blob costs an addition, not a walk of the cache.
        self._size = 0
        # Blobs that land while a pass scans may be missed by its scan: they are counted
        # again on top of its result (counting twice only costs an early extra pass).
        self._added_during_pass = 0
        metrics.cache_max_size.set(max_size or 0)

    @property
    def enabled(self) -> bool:
        return self._max_size is not None or self._max_idle is not None

    def added(self, size: int) -> None:
        """A blob of `size` bytes landed: ask for a pass if that passes the bound."""
        self._size += size
        self._added_during_pass += size
        if self._max_size is not None and self._size > self._max_size:
            self._wake.set()

    async def run(self) -> None:
        """Evict now, then on every poke or every SCAN_INTERVAL, until cancelled."""
        while True:
            try:
                await self.evict()
            except OSError as exc:
                log.warning("eviction pass failed: %s", exc)
            over = self._max_size is not None and self._size > self._max_size
            if over and self._added_during_pass:
                continue  # blobs landed during the pass and took it over the bound again
            await _wait_or_timeout(self._wake, SCAN_INTERVAL)
            self._wake.clear()

    async def evict(self, max_size: int | None = None) -> EvictionResult:
        """One pass: delete what the bounds (or an explicit `max_size`) call for."""
        bound = max_size if max_size is not None else self._max_size
        busy = {str(digest) for digest in self._busy()}
        self._added_during_pass = 0
        result = await asyncio.to_thread(self._evict_sync, bound, busy)
        self._size = result.remaining + self._added_during_pass
        size, count = await self._storage.usage()
        self._metrics.cache_size.set(size)
        self._metrics.cache_objects.set(count)
        return result

    def _evict_sync(self, max_size: int | None, busy: set[str]) -> EvictionResult:
        blobs = scan_blobs(self._storage)
        total = sum(blob.size for blob in blobs)
        victims = choose_victims(blobs, total, max_size, self._max_idle, busy, time.time())
        freed = 0
        for blob, reason in victims:
            try:
                os.unlink(blob.path)
            except FileNotFoundError:
                continue
            freed += blob.size
            self._metrics.evictions.labels(reason).inc()
            self._metrics.evicted_bytes.inc(blob.size)
        if victims:
            log.info("evicted %d blobs, %d bytes", len(victims), freed)
        return EvictionResult(len(victims), freed, total - freed)


async def _wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event`, at most `seconds`. Not `wait_for`: on Python 3.11 it swallows a
    cancellation that lands as the event is set, and shutdown then waits on a pass that
    never ends."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
