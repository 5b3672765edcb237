"""Redis in three forms (one server, Sentinel, Cluster): one client for a `redis.url`.

The URL forms are parsed in mirror/config/redis.py. Whatever the form, `open_redis` gives one
client whose commands go to the right node, and which finds a new master by itself after a
Sentinel failover.

The rule for every key the mirror writes, so that it works on a Cluster: one command,
pipeline, transaction or script touches the keys of one hash slot only; keys that must go
together share a `{hash tag}`. Listing keys (SCAN) is done on every master: `scan_keys`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from mirror.config.redis import RedisTarget, parse_redis_url

SENTINEL_RETRIES = 1
CLUSTER_RETRIES = 1
# Errors that mean "Redis cannot answer now: answer from memory, try again later". In a
# Sentinel failover they are ConnectionError (old master gone, or MasterNotFoundError while
# no master is elected) and ReadOnlyError (a demoted master); in a Cluster,
# RedisClusterException (no node reachable), which is not a RedisError.
DOWN_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
RedisClient = aioredis.Redis | aioredis.RedisCluster


class RedisConnection:
    """One Redis client for any topology, and what it takes to close it."""

    def __init__(
        self,
        target: RedisTarget,
        client: RedisClient,
        max_connections: int,
        sentinel: Sentinel | None = None,
    ) -> None:
        self.target = target
        self.client = client
        # Sentinel's and Cluster's pools raise past their size instead of waiting: each
        # command takes a turn here, so a burst is never taken for an outage.
        self.turns = asyncio.Semaphore(max_connections)
        self._sentinel = sentinel

    async def scan_keys(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching `match`; on a Cluster, from every master (redis-py's cluster
        SCAN goes to each primary in turn)."""
        seen: set[str] = set()
        async for key in self.client.scan_iter(match=match, count=count):
            # A key may be met twice: SCAN's own guarantee, or a slot moving meanwhile.
            if key not in seen:
                seen.add(key)
                yield str(key)

    async def close(self) -> None:
        if isinstance(self.client, aioredis.RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            await asyncio.gather(*(s.aclose() for s in self._sentinel.sentinels))


def open_redis(url: str, max_connections: int, **options: Any) -> RedisConnection:
    """A client for `url` (validated already), with `options` for every connection.

    `max_connections` bounds the connections to each node; callers keep their concurrency
    below it by taking the connection's `turns`, since only the single-server pool waits
    for a free connection.
    """
    target = parse_redis_url("redis.url", url)
    if target.topology == "cluster":
        # redis-py's default retries a failing command 3 times with backoff, reading the
        # cluster's layout again each time: with a master lost and its slots uncovered, a
        # call took 3-8 s to fail, every call, for the whole outage. One quick retry (a
        # MOVED or ASK is followed all the same: that is no retry), then the fallback.
        options.setdefault("retry", Retry(NoBackoff(), CLUSTER_RETRIES))
        cluster = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            **options,
        )
        return RedisConnection(target, cluster, max_connections)
    if target.topology == "sentinel":
        return _sentinel_connection(target, max_connections, options)
    # A blocking pool: a burst of requests waits its turn for a connection instead of
    # failing (redis-py's default pool raises past its limit), which would look like an outage.
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=2, **options
    )
    return RedisConnection(target, aioredis.Redis(connection_pool=pool), max_connections)


def _sentinel_connection(
    target: RedisTarget, max_connections: int, options: dict[str, Any]
) -> RedisConnection:
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    # redis-py's own default for a client retries 10 times with backoff (~4 s against a
    # dead sentinel): one quick retry, then the next sentinel, then the in-memory fallback.
    sentinel_options.update(decode_responses=True, retry=Retry(NoBackoff(), SENTINEL_RETRIES))
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs=sentinel_options,
        username=target.username,
        password=target.password,
        db=target.db,
        **options,
    )
    # The pool asks Sentinel for the master's address at every new connection, and drops
    # the connections to an old master when the address changes: reconnecting after a
    # failover reaches the new master without anything of ours.
    client = sentinel.master_for(
        target.master, redis_class=aioredis.Redis, max_connections=max_connections
    )
    return RedisConnection(target, client, max_connections, sentinel)
