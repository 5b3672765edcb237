"""The metadata store every replica shares: one Redis (a server, Sentinel or Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ClusterDownError

from mirror.metadata.store import (
    BUCKET_BLOBS_KEY,
    REPOS_KEY,
    RETENTION,
    TAG_PATTERN,
    TAG_PREFIX,
    TOKEN_PREFIX,
    TagRecord,
    holdings_key,
    tag_key,
)
from mirror.metadata.topology import open_redis

REDIS_CONNECTIONS = 64
# The longest the commands of one turn may take (seconds), past the socket timeout's 2 s:
# then TimeoutError, answered from memory by the fallback as any outage is.
COMMAND_DEADLINE = 2.5
# A bucket blob's record ("size read_at") given a new last read, only if it exists; its size.
TOUCH_SCRIPT = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
local size = string.match(record, '^%S+')
redis.call('HSET', KEYS[1], ARGV[1], size .. ' ' .. ARGV[2])
return size
"""


class RedisMetadata:
    """Metadata shared by every replica through one Redis: a server, Sentinel or Cluster.

    Every command touches one key, so each works under Cluster hash slots as it is.
    """

    def __init__(self, url: str, ttl: float, retention: float = RETENTION) -> None:
        # At least a second: `tag_ttl: 0` with `stale_if_error: 0` (always revalidate) would
        # be SET EX 0, which Redis refuses, and EXPIRE 0, which deletes.
        self._expiry = max(1, math.ceil(ttl + retention))
        self._conn = open_redis(
            url,
            REDIS_CONNECTIONS,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=30,
        )
        self._redis = self._conn.client
        self._turns = self._conn.turns  # every command takes one (topology.py)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A turn on the connections, then COMMAND_DEADLINE for the commands sent in it.
        The socket timeout bounds each exchange, not a command: a Cluster that lost a
        master retried and read its layout again for 3-8 s a command. Waiting for the turn
        is not counted: a burst is no outage."""
        async with self._turns, asyncio.timeout(COMMAND_DEADLINE):
            yield

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        async with self._turn():
            raw = await self._redis.get(tag_key(upstream, repo, tag))
        return None if raw is None else TagRecord.from_json(raw)

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        key = tag_key(upstream, repo, tag)
        async with self._turn():
            await self._redis.set(key, record.to_json(), ex=self._expiry)

    async def add_repository(self, repo: str) -> None:
        async with self._turn():
            await self._redis.zadd(REPOS_KEY, {repo: 0})

    async def add_holdings(
        self, upstream: str, repo: str, digests: Sequence[str], at: float
    ) -> None:
        if not digests:
            return
        key = holdings_key(upstream, repo)
        # One key, so one slot: a pipeline (no transaction) is fine on a Cluster too.
        async with self._turn():
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(key, dict.fromkeys(digests, at))
            pipe.zremrangebyscore(key, "-inf", at - self._expiry)
            pipe.expire(key, self._expiry)
            await pipe.execute()

    async def holds(self, upstream: str, repo: str, digest: str) -> bool:
        async with self._turn():
            at = await self._redis.zscore(holdings_key(upstream, repo), digest)
        return at is not None and time.time() - float(at) < self._expiry

    async def repositories(self, n: int, last: str | None) -> list[str]:
        start = f"({last}" if last else "-"
        async with self._turn():
            names = await self._redis.zrangebylex(REPOS_KEY, start, "+", start=0, num=n)
        return [str(name) for name in names]

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        found = []
        # On a Cluster the tag keys are spread over every master: each one is scanned.
        async for key in self._conn.scan_keys(TAG_PATTERN):
            async with self._turn():
                raw = await self._redis.get(key)
            if raw is None:
                continue
            # Repository names and tags hold no colon; an upstream name may (host:port).
            upstream, repo, tag = key[len(TAG_PREFIX) :].rsplit(":", 2)
            record = TagRecord.from_json(raw)
            if record is not None:  # one this release cannot read: not listed
                found.append((upstream, repo, tag, record))
        return found

    async def ping(self) -> None:
        """Raise unless Redis answers; a Cluster, unless it also serves every slot (any
        live node answers PING while a lost master's keys fail)."""
        async with self._turn():
            await self._redis.ping()
            if isinstance(self._redis, aioredis.RedisCluster):
                state = (await self._redis.cluster_info()).get("cluster_state")
                if state != "ok":
                    raise ClusterDownError(f"cluster_state is {state}")

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        async with self._turn():
            await self._redis.hset(BUCKET_BLOBS_KEY, digest, f"{size} {read_at}")

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        async with self._turn():
            raw = await self._redis.hgetall(BUCKET_BLOBS_KEY)
        found = {}
        for digest, value in raw.items():
            size, _, read_at = str(value).partition(" ")
            found[str(digest)] = (int(size), float(read_at))
        return found

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        async with self._turn():
            value = await self._redis.hget(BUCKET_BLOBS_KEY, digest)
        if value is None:
            return None
        size, _, read_at = str(value).partition(" ")
        return int(size), float(read_at)

    async def touch_blob_read(self, digest: str, read_at: float) -> int | None:
        # One script, so that an eviction's HDEL cannot fall between the check and the set
        # (one key: one slot, as a Cluster needs).
        async with self._turn():
            size = await self._redis.eval(TOUCH_SCRIPT, 1, BUCKET_BLOBS_KEY, digest, str(read_at))
        return None if size is None else int(size)

    async def forget_blob(self, digest: str) -> None:
        async with self._turn():
            await self._redis.hdel(BUCKET_BLOBS_KEY, digest)

    async def get_token(self, key: str) -> tuple[str, float] | None:
        async with self._turn():
            raw = await self._redis.get(TOKEN_PREFIX + key)
        if raw is None:
            return None
        expires_at, _, token = str(raw).partition(" ")
        return token, float(expires_at)

    async def put_token(self, key: str, token: str, expires_at: float) -> None:
        keep = int((expires_at - time.time()) * 1000)
        if keep > 0:
            async with self._turn():
                await self._redis.set(TOKEN_PREFIX + key, f"{expires_at} {token}", px=keep)

    async def close(self) -> None:
        await self._conn.close()
