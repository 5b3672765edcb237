"""Tag freshness and the repository catalogue: in Redis, or in-process for a single node.

A tag record says which digest a tag pointed at and when the upstream last confirmed it.
Freshness is judged from `checked_at` against `cache.tag_ttl` by the caller; the store
itself only keeps records for `RETENTION` beyond that, so an expired tag can still be
served when the upstream is down, and a tag nobody asks for eventually goes away.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mirror.metadata.topology import DOWN_ERRORS, open_redis

log = logging.getLogger(__name__)

# Every key starts with this, so the mirror can share a Redis with other tenants.
KEY_PREFIX = "mirror:"
# One key per tag record (no hash tag: each is read and written alone, so a Cluster spreads
# them over its masters). The braces are str.format fields, never part of a key: names and
# tags cannot hold them (OCI grammar).
TAG_PREFIX = KEY_PREFIX + "tag:"
TAG_KEY = TAG_PREFIX + "{upstream}:{repo}:{tag}"
TAG_PATTERN = TAG_PREFIX + "*"
# A sorted set with every score 0: Redis orders it lexically, which is the order
# `_catalog` must page in (ZRANGEBYLEX), with no sorting on our side.
REPOS_KEY = KEY_PREFIX + "repos"
# A hash of digest → "size last-read-time" for the blobs in the S3 bucket (storage.s3).
BUCKET_BLOBS_KEY = KEY_PREFIX + "bucket-blobs"
# How long a tag record outlives its TTL by default (cache.stale_if_error): a week of
# serving stale through an outage.
RETENTION = 7 * 86400
REDIS_CONNECTIONS = 64
# Backoff between attempts to reach a Redis that stopped answering.
RETRY_BASE = 1.0
RETRY_MAX = 30.0


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag resolved to upstream, and when that was last confirmed."""

    digest: str
    media_type: str
    size: int
    checked_at: float

    def is_fresh(self, ttl: float, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.checked_at < ttl

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> TagRecord:
        return cls(**json.loads(raw))


class MetadataStore(Protocol):
    """Where tag records and the catalogue live."""

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None: ...

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None: ...

    async def add_repository(self, repo: str) -> None: ...

    async def repositories(self, n: int, last: str | None) -> list[str]: ...

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # The S3 bucket's blobs (storage.s3): size and last-read time, for its eviction.
    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None: ...

    async def blob_reads(self) -> dict[str, tuple[int, float]]: ...

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None: ...

    async def forget_blob(self, digest: str) -> None: ...


def _tag_key(upstream: str, repo: str, tag: str) -> str:
    return TAG_KEY.format(upstream=upstream, repo=repo, tag=tag)


class MemoryMetadata:
    """In-process metadata for a single node with no Redis.

    With a `snapshot` path it survives restarts: loaded at start, written (atomically)
    when changed and at shutdown, so a restarted mirror can still answer tags while
    the upstream is down.
    """

    def __init__(
        self, ttl: float, retention: float = RETENTION, snapshot: Path | None = None
    ) -> None:
        self._expiry = ttl + retention
        self._tags: dict[tuple[str, str, str], TagRecord] = {}
        self._repos: list[str] = []
        self._bucket_blobs: dict[str, tuple[int, float]] = {}
        self._snapshot = snapshot
        self._dirty = False

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        key = (upstream, repo, tag)
        record = self._tags.get(key)
        if record is not None and not record.is_fresh(self._expiry):
            del self._tags[key]
            return None
        return record

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        self._tags[(upstream, repo, tag)] = record
        self._dirty = True

    async def add_repository(self, repo: str) -> None:
        index = bisect.bisect_left(self._repos, repo)
        if index == len(self._repos) or self._repos[index] != repo:
            self._repos.insert(index, repo)
            self._dirty = True

    async def repositories(self, n: int, last: str | None) -> list[str]:
        start = bisect.bisect_right(self._repos, last) if last else 0
        return self._repos[start : start + n]

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        return [(*key, record) for key, record in self._tags.items()]

    async def ping(self) -> None:
        return None

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        self._bucket_blobs[digest] = (size, read_at)
        self._dirty = True

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        return dict(self._bucket_blobs)

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        return self._bucket_blobs.get(digest)

    async def forget_blob(self, digest: str) -> None:
        if self._bucket_blobs.pop(digest, None) is not None:
            self._dirty = True

    async def load(self) -> None:
        """Read the snapshot, if there is one (a bad one is set aside, not fatal)."""
        if self._snapshot is None:
            return
        try:
            raw = await asyncio.to_thread(self._snapshot.read_text)
            data = json.loads(raw)
            self._tags = {
                (entry["upstream"], entry["repo"], entry["tag"]): TagRecord(**entry["record"])
                for entry in data["tags"]
            }
            self._repos = sorted(set(data["repositories"]))
            self._bucket_blobs = {
                digest: (int(size), float(read_at))
                for digest, (size, read_at) in data.get("bucket_blobs", {}).items()
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable metadata snapshot %s: %s", self._snapshot, exc)

    async def save(self) -> None:
        """Write the snapshot when something changed since the last one."""
        if self._snapshot is None or not self._dirty:
            return
        self._dirty = False
        data = {
            "tags": [
                {"upstream": u, "repo": r, "tag": t, "record": asdict(record)}
                for (u, r, t), record in self._tags.items()
                if record.is_fresh(self._expiry)
            ],
            "repositories": self._repos,
            "bucket_blobs": self._bucket_blobs,
        }
        try:
            await asyncio.to_thread(_write_atomically, self._snapshot, json.dumps(data))
        except OSError as exc:
            self._dirty = True
            log.warning("cannot write metadata snapshot %s: %s", self._snapshot, exc.strerror)

    async def close(self) -> None:
        await self.save()


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


class RedisMetadata:
    """Metadata shared by every replica through one Redis: a server, Sentinel or Cluster.

    Every command touches one key, so each works under Cluster hash slots as it is.
    """

    def __init__(self, url: str, ttl: float, retention: float = RETENTION) -> None:
        self._expiry = int(ttl + retention)
        self._conn = open_redis(
            url,
            REDIS_CONNECTIONS,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=30,
        )
        self._redis = self._conn.client
        # Sentinel's and Cluster's pools fail past their size instead of waiting: a burst
        # of requests takes turns here, so it is never taken for an outage.
        self._turns = asyncio.Semaphore(REDIS_CONNECTIONS)

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        async with self._turns:
            raw = await self._redis.get(_tag_key(upstream, repo, tag))
        return None if raw is None else TagRecord.from_json(raw)

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        key = _tag_key(upstream, repo, tag)
        async with self._turns:
            await self._redis.set(key, record.to_json(), ex=self._expiry)

    async def add_repository(self, repo: str) -> None:
        async with self._turns:
            await self._redis.zadd(REPOS_KEY, {repo: 0})

    async def repositories(self, n: int, last: str | None) -> list[str]:
        start = f"({last}" if last else "-"
        async with self._turns:
            names = await self._redis.zrangebylex(REPOS_KEY, start, "+", start=0, num=n)
        return [str(name) for name in names]

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        found = []
        # On a Cluster the tag keys are spread over every master: each one is scanned.
        async for key in self._conn.scan_keys(TAG_PATTERN):
            async with self._turns:
                raw = await self._redis.get(key)
            if raw is None:
                continue
            # Repository names and tags hold no colon; an upstream name may (host:port).
            upstream, repo, tag = key[len(TAG_PREFIX) :].rsplit(":", 2)
            found.append((upstream, repo, tag, TagRecord.from_json(raw)))
        return found

    async def ping(self) -> None:
        async with self._turns:
            await self._redis.ping()

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        await self._redis.hset(BUCKET_BLOBS_KEY, digest, f"{size} {read_at}")

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        raw = await self._redis.hgetall(BUCKET_BLOBS_KEY)
        found = {}
        for digest, value in raw.items():
            size, _, read_at = str(value).partition(" ")
            found[str(digest)] = (int(size), float(read_at))
        return found

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        value = await self._redis.hget(BUCKET_BLOBS_KEY, digest)
        if value is None:
            return None
        size, _, read_at = str(value).partition(" ")
        return int(size), float(read_at)

    async def forget_blob(self, digest: str) -> None:
        await self._redis.hdel(BUCKET_BLOBS_KEY, digest)

    async def close(self) -> None:
        await self._conn.close()


class FallbackMetadata:
    """Redis, with the in-process store standing in while Redis is unreachable.

    A Redis outage must never fail a request: each call that cannot reach Redis is
    answered from memory, Redis is retried with backoff, and records written meanwhile
    live in memory only. When Redis comes back empty, tags simply revalidate upstream.
    """

    def __init__(
        self,
        primary: MetadataStore,
        fallback: MetadataStore,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._on_change = on_change
        self._clock = clock
        self._up = True
        self._retry_at = 0.0
        self._delay = RETRY_BASE

    @property
    def up(self) -> bool:
        return self._up

    def _use_primary(self) -> bool:
        return self._up or self._clock() >= self._retry_at

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
                result = await getattr(self._primary, name)(*args)
            except DOWN_ERRORS as exc:
                self._failed(exc)
            else:
                self._succeeded()
                return result
        return await getattr(self._fallback, name)(*args)

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

    async def forget_blob(self, digest: str) -> None:
        await self._fallback.forget_blob(digest)
        await self._call("forget_blob", digest)

    async def ping(self) -> None:
        """Raise when Redis does not answer (for /readyz), whatever the fallback does."""
        try:
            await self._primary.ping()
        except DOWN_ERRORS as exc:
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
) -> MetadataStore:
    """Redis (with an in-process stand-in) when a URL is configured, else in-process
    (kept in `snapshot` across restarts).

    Records are kept `retention` past their TTL: the window for serving them stale.
    """
    if redis_url:
        memory = MemoryMetadata(ttl, retention)
        return FallbackMetadata(RedisMetadata(redis_url, ttl, retention), memory, on_change)
    return MemoryMetadata(ttl, retention, snapshot)
