"""A shared store (Redis, or the workers' SQLite file) with the in-process store standing in
while it fails, and the store a config picks."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mirror.metadata.memory import STANDIN_ENTRIES, MemoryMetadata
from mirror.metadata.redis import RedisMetadata
from mirror.metadata.sqlite import SqliteMetadata
from mirror.metadata.store import RETENTION, MetadataStore, TagRecord, TokenStore
from mirror.metadata.topology import DOWN_ERRORS

log = logging.getLogger(__name__)

# What a SQLite file raises when it cannot answer: locked past the busy timeout, the disk
# full or failing, the file torn.
SQLITE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OSError)
# Backoff between attempts to reach a store that stopped answering.
RETRY_BASE = 1.0
RETRY_MAX = 30.0


class FallbackMetadata:
    """A shared store (Redis, or SQLite), with the in-process store standing in while the
    shared one fails.

    A metadata outage must never fail a request: each call that raises one of `errors` is
    answered from memory, the shared store is retried with backoff, and records written
    meanwhile live in memory only. When it comes back empty, tags simply revalidate
    upstream.
    """

    def __init__(
        self,
        primary: MetadataStore,
        fallback: MetadataStore,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        errors: tuple[type[Exception], ...] = DOWN_ERRORS,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._errors = errors
        # While the store is down, one call at a time tries it again once its backoff is
        # over; the others are answered from memory meanwhile, not all made to wait.
        self._probing = False
        self._on_change = on_change
        self._clock = clock
        self._up = True
        self._retry_at = 0.0
        self._delay = RETRY_BASE

    @property
    def up(self) -> bool:
        return self._up

    def _use_primary(self) -> bool:
        return self._up or (not self._probing and self._clock() >= self._retry_at)

    def _succeeded(self) -> None:
        if not self._up:
            log.warning("metadata store reachable again")
            self._up = True
            self._delay = RETRY_BASE
            if self._on_change is not None:
                self._on_change(True)

    def _failed(self, exc: Exception) -> None:
        if self._up:
            log.warning(
                "metadata store unreachable (%s): using in-process metadata", type(exc).__name__
            )
            if self._on_change is not None:
                self._on_change(False)
        self._up = False
        self._retry_at = self._clock() + self._delay
        self._delay = min(self._delay * 2, RETRY_MAX)

    async def _call(self, name: str, *args: Any) -> Any:
        if self._use_primary():
            try:
                result = await self._primary_call(name, *args)
            except self._errors as exc:
                self._failed(exc)
            else:
                self._succeeded()
                return result
        return await getattr(self._fallback, name)(*args)

    async def _primary_call(self, name: str, *args: Any) -> Any:
        """The shared store's answer; the only call on it while it is down."""
        probing = not self._up
        self._probing |= probing
        try:
            return await getattr(self._primary, name)(*args)
        finally:
            if probing:
                self._probing = False

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        record: TagRecord | None = await self._call("get_tag", upstream, repo, tag)
        return record

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        # Memory always gets a copy, so an outage starts with the tags seen lately.
        await self._fallback.put_tag(upstream, repo, tag, record)
        await self._call("put_tag", upstream, repo, tag, record)

    async def add_repository(self, repo: str) -> None:
        await self._fallback.add_repository(repo)
        await self._call("add_repository", repo)

    async def add_holdings(
        self, upstream: str, repo: str, digests: Sequence[str], at: float
    ) -> None:
        await self._fallback.add_holdings(upstream, repo, digests, at)
        await self._call("add_holdings", upstream, repo, digests, at)

    async def holds(self, upstream: str, repo: str, digest: str) -> bool:
        held: bool = await self._call("holds", upstream, repo, digest)
        return held

    async def repositories(self, n: int, last: str | None) -> list[str]:
        names: list[str] = await self._call("repositories", n, last)
        return names

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        found: list[tuple[str, str, str, TagRecord]] = await self._call("tags")
        return found

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        await self._fallback.put_blob_read(digest, size, read_at)
        await self._call("put_blob_read", digest, size, read_at)

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = await self._call("blob_reads")
        return found

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        found: tuple[int, float] | None = await self._call("get_blob_read", digest)
        return found

    async def touch_blob_read(self, digest: str, read_at: float) -> int | None:
        await self._fallback.touch_blob_read(digest, read_at)
        size: int | None = await self._call("touch_blob_read", digest, read_at)
        return size

    async def forget_blob(self, digest: str) -> None:
        await self._fallback.forget_blob(digest)
        await self._call("forget_blob", digest)

    async def get_token(self, key: str) -> tuple[str, float] | None:
        """A shared token, if the shared store answers (else each process fetches its own)."""
        if not isinstance(self._primary, TokenStore) or not self._use_primary():
            return None
        try:
            found: tuple[str, float] | None = await self._primary_call("get_token", key)
        except self._errors as exc:
            self._failed(exc)
            return None
        return found

    async def put_token(self, key: str, token: str, expires_at: float) -> None:
        if isinstance(self._primary, TokenStore) and self._use_primary():
            try:
                await self._primary_call("put_token", key, token, expires_at)
            except self._errors as exc:
                self._failed(exc)

    async def ping(self) -> None:
        """Raise when the shared store does not answer (for /readyz), whatever the fallback does."""
        try:
            await self._primary.ping()
        except self._errors as exc:
            self._failed(exc)
            raise
        self._succeeded()

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()


def open_metadata(
    redis_url: str | None,
    ttl: float,
    retention: float = RETENTION,
    on_change: Callable[[bool], None] | None = None,
    snapshot: Path | None = None,
    shared: Path | None = None,
) -> MetadataStore:
    """Redis when a URL is configured, else the SQLite file `shared` when processes share
    the cache directory (workers), either with an in-process stand-in, else in-process (kept
    in `snapshot` across restarts: the fastest, for a single process).

    Records are kept `retention` past their TTL: the window for serving them stale.
    """
    if redis_url:
        memory = MemoryMetadata(ttl, retention, limit=STANDIN_ENTRIES)
        return FallbackMetadata(RedisMetadata(redis_url, ttl, retention), memory, on_change)
    if shared is not None:  # a file on the cache disk: it can fill, fail or stay locked
        memory = MemoryMetadata(ttl, retention, limit=STANDIN_ENTRIES)
        sqlite = SqliteMetadata(shared, ttl, retention)
        return FallbackMetadata(sqlite, memory, on_change, errors=SQLITE_ERRORS)
    return MemoryMetadata(ttl, retention, snapshot)
