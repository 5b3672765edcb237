"""The `redis:` section: one URL, in any of three forms (one server, Sentinel, Cluster).

    redis://[user:pass@]host[:port][/db]    rediss://… (TLS)    unix:///path/redis.sock[?db=N]
    redis+sentinel://[user:pass@]host1:26379,host2:26379/<master name>[/db]
    redis+cluster://[user:pass@]host1:7000,host2:7001,host3:7002

The credentials are the data nodes' (master and replicas, cluster nodes); the sentinels are
asked without them. mirror/metadata/topology.py opens a client for a parsed URL.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.connection import parse_url as redis_url_options

from mirror.config.values import ConfigError, kind, section

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SERVER_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
# A host in a list of hosts: `[v6]:port`, `name:port` or either without its port.
_HOST = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:/@,\s]+))(?::(?P<port>[0-9]{1,5}))?$"
)

Topology = Literal["server", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None


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


def redis_section(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The `redis:` mapping with its keys checked; its URL is parsed by `parse_redis`."""
    return section(raw, "redis", {"url"})


def parse_redis(sec: Mapping[str, Any]) -> RedisConfig:
    """The `redis:` mapping validated (no URL: metadata stays in the process)."""
    url = sec.get("url")
    return RedisConfig(url=None if url is None else validate_redis_url("redis.url", url))


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`, for messages; userinfo without a `:`
    all of it (redis://secret@host is a password often enough)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if not sep or not at:
        return url
    if ":" not in userinfo:
        return f"{scheme}://***@{after}"
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}"


def _password(url: str) -> str:
    """What `redacted` hides: all between the user's `:` and the last `@`. Not urlsplit's
    idea of it, which ends at a `/` (base64 passwords hold them)."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def parse_redis_url(key: str, value: object) -> RedisTarget:
    """Validate a Redis URL of any of the three forms; ConfigError names `key`."""
    if not isinstance(value, str):  # never shown: a mapping may hold the password
        raise ConfigError(key, f"expected a redis:// URL, got {kind(value)}")
    text = value.strip()
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
    if "/" in _password(text):  # it would end the host part: redis-py reads another URL
        raise ConfigError(key, f"a password's / must be written %2F, in {redacted(text)!r}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        kwargs = redis_url_options(text)
    except ValueError as exc:
        raise ConfigError(key, f"{_without_secret(exc, text)} in {redacted(text)!r}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(key, f"expected a host, got {redacted(text)!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(key, f"expected a socket path, got {redacted(text)!r}")
    if parts.scheme != "unix" and not re.fullmatch(r"/?(\d+)?/?", parts.path):
        raise ConfigError(key, f"expected a database number as path, got {redacted(text)!r}")
    unknown = sorted(set(kwargs) - _url_options(parts.scheme))
    if unknown:  # redis-py passes any query key on, to fail every command it is given
        raise ConfigError(key, f"{unknown[0]!r} is no option of a {parts.scheme}:// connection")
    return RedisTarget(
        "server",
        text.rstrip("/"),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
    )


def _url_options(scheme: str) -> set[str]:
    """The query keys a URL of `scheme` may carry: the keyword arguments of the connection
    class redis-py opens for it (the pool's own too)."""
    connection = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(
        scheme, Connection
    )
    names = {"connection_class", "max_connections"}
    for cls in connection.__mro__:
        if "__init__" in vars(cls):
            parameters = inspect.signature(vars(cls)["__init__"]).parameters.values()
            names.update(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
            names.update(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)
    return names - {"self"}


def _without_secret(exc: ValueError, text: str) -> str:
    message, password = str(exc), _password(text)
    for shown in {password, unquote(password)} - {""}:
        message = message.replace(shown, "***")
    return message


def _replicated(key: str, text: str, scheme: str) -> RedisTarget:
    rest = text.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise ConfigError(key, f"takes no query or fragment, got {redacted(text)!r}")
    # The last `@` ends the credentials, which may hold `/` (base64); without one, the
    # hosts end at the first `/`.
    userinfo, at, after = rest.rpartition("@")
    hosts, _, path = after.partition("/")
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


def _db_number(text: str) -> bool:
    """A database number: ASCII digits (str.isdigit takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit() and len(text) <= 5


def _sentinel_path(key: str, text: str, segments: list[str]) -> tuple[str, int]:
    if not segments or len(segments) > 2 or (len(segments) == 2 and not _db_number(segments[1])):
        raise ConfigError(
            key, f"expected redis+sentinel://host:port,…/<master name>[/db], got {redacted(text)!r}"
        )
    return unquote(segments[0]), int(segments[1]) if len(segments) == 2 else 0


def _cluster_db(key: str, text: str, segments: list[str]) -> int:
    if segments and segments != ["0"]:
        raise ConfigError(key, f"a Redis Cluster has only database 0, got {redacted(text)!r}")
    return 0
