"""Redis in three forms (one server, Sentinel, Cluster): the `redis.url` of each and its client.

    redis://[user:pass@]host[:port][/db]    rediss://… (TLS)    unix:///path/redis.sock[?db=N]
    redis+sentinel://[user:pass@]host1:26379,host2:26379/<master name>[/db]
    redis+cluster://[user:pass@]host1:7000,host2:7001,host3:7002

The credentials are the data nodes' (master and replicas, cluster nodes); the sentinels are
asked without them. Whatever the form, `open_redis` gives one client whose commands go to
the right node, and which finds a new master by itself after a Sentinel failover.

The rule for every key the mirror writes, so that it works on a Cluster: one command,
pipeline, transaction or script touches the keys of one hash slot only; keys that must go
together share a `{hash tag}`. Listing keys (SCAN) is done on every master: `scan_keys`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from mirror.config import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SERVER_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_RETRIES = 1
# Errors that mean "Redis cannot answer now: answer from memory, try again later". In a
# Sentinel failover they are ConnectionError (old master gone, or MasterNotFoundError while
# no master is elected) and ReadOnlyError (a demoted master); in a Cluster,
# RedisClusterException (no node reachable), which is not a RedisError.
DOWN_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
# A host in a list of hosts: `[v6]:port`, `name:port` or either without its port.
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:/@,\s]+))(?::(?P<port>\d+))?$")

Topology = Literal["server", "sentinel", "cluster"]
RedisClient = aioredis.Redis | aioredis.RedisCluster


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `redis.url`: which topology, which nodes, which database."""

    topology: Topology
    url: str = field(repr=False)  # as configured (a single server's is given to redis-py)
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}{at}{hosts}{slash}{path}"


def parse_redis_url(key: str, value: object) -> RedisTarget:
    """Validate a Redis URL of any of the three forms; ConfigError names `key`."""
    text = str(value).strip()
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme in SERVER_SCHEMES:
        return _server(key, text)
    if scheme in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        return _replicated(key, text, scheme)
    raise ConfigError(
        key,
        "expected redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://, "
        f"got {redacted(text)!r}",
    )


def validate_redis_url(key: str, value: object) -> str:
    """The URL to keep in the config, once it parsed (without a trailing slash)."""
    return parse_redis_url(key, value).url


def _server(key: str, text: str) -> RedisTarget:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        kwargs = aioredis.connection.parse_url(text)
    except ValueError as exc:
        raise ConfigError(key, f"{_without_secret(exc, text)} in {redacted(text)!r}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(key, f"expected a host, got {redacted(text)!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(key, f"expected a socket path, got {redacted(text)!r}")
    if parts.scheme != "unix" and not re.fullmatch(r"/?(\d+)?/?", parts.path):
        raise ConfigError(key, f"expected a database number as path, got {redacted(text)!r}")
    return RedisTarget(
        "server",
        text.rstrip("/"),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
    )


def _without_secret(exc: ValueError, text: str) -> str:
    message = str(exc)
    password = urlsplit(text).password if "@" in text else None
    return message.replace(password, "***") if password else message


def _replicated(key: str, text: str, scheme: str) -> RedisTarget:
    rest = text.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise ConfigError(key, f"takes no query or fragment, got {redacted(text)!r}")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username, _, password = userinfo.partition(":")
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_PORT
    nodes = tuple(_node(key, text, host, default_port) for host in hosts.split(","))
    segments = [segment for segment in path.split("/") if segment]
    if scheme == CLUSTER_SCHEME:
        master, db = "", _cluster_db(key, text, segments)
    else:
        master, db = _sentinel_path(key, text, segments)
    return RedisTarget(
        "sentinel" if scheme == SENTINEL_SCHEME else "cluster",
        text.rstrip("/"),
        nodes=nodes,
        master=master,
        db=db,
        username=unquote(username) or None if at else None,
        password=unquote(password) or None if at else None,
    )


def _node(key: str, text: str, host: str, default_port: int) -> tuple[str, int]:
    match = _HOST.match(host)
    port = int(match.group("port") or default_port) if match else 0
    if match is None or not 0 < port < 65536:
        raise ConfigError(key, f"expected host:port in a list, got {host!r} in {redacted(text)!r}")
    return match.group("v6") or match.group("name"), port


def _sentinel_path(key: str, text: str, segments: list[str]) -> tuple[str, int]:
    if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ConfigError(
            key, f"expected redis+sentinel://host:port,…/<master name>[/db], got {redacted(text)!r}"
        )
    return unquote(segments[0]), int(segments[1]) if len(segments) == 2 else 0


def _cluster_db(key: str, text: str, segments: list[str]) -> int:
    if segments and segments != ["0"]:
        raise ConfigError(key, f"a Redis Cluster has only database 0, got {redacted(text)!r}")
    return 0


class RedisConnection:
    """One Redis client for any topology, and what it takes to close it."""

    def __init__(
        self, target: RedisTarget, client: RedisClient, sentinel: Sentinel | None = None
    ) -> None:
        self.target = target
        self.client = client
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

    `max_connections` bounds the connections to each node; the caller keeps its own
    concurrency below it, since only the single-server pool waits for a free connection.
    """
    target = parse_redis_url("redis.url", url)
    if target.topology == "cluster":
        cluster = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            **options,
        )
        return RedisConnection(target, cluster)
    if target.topology == "sentinel":
        return _sentinel_connection(target, max_connections, options)
    # A blocking pool: a burst of requests waits its turn for a connection instead of
    # failing (redis-py's default pool raises past its limit), which would look like an outage.
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=2, **options
    )
    return RedisConnection(target, aioredis.Redis(connection_pool=pool))


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
    return RedisConnection(target, client, sentinel)
