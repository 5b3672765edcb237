"""Configuration: YAML file, then command-line overrides, validated into frozen dataclasses.

Every problem raises `ConfigError` naming the key and the bad value, so the CLI can print one
line and exit 2 before anything starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from mirror.access.policy import Policy
    from mirror.config.cluster import ClusterConfig
    from mirror.config.s3 import S3Config
    from mirror.net.tls import TLSConfig

DEFAULT_UPSTREAM = "https://registry-1.docker.io"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5}


class ConfigError(Exception):
    """A configuration key has a bad value; the message names both."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key


DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = DEFAULT_UPSTREAM
    # The registry's name for routing (`?ns=`, path prefix), metrics and tag keys;
    # empty: derived from the URL (`docker.io` for Docker Hub, else host[:port]).
    name: str = ""
    username: str | None = None
    # repr=False keeps secrets out of any log line that prints the config.
    password: str | None = field(default=None, repr=False)
    password_command: str | None = field(default=None, repr=False)
    password_refresh: float | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    tag_ttl: float | None = None  # overrides cache.tag_ttl for this upstream
    # TLS to this upstream (mirror/tls.py): an extra CA, the check, a client pair (mTLS).
    ca_file: Path | None = None
    tls_verify: bool = True
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def registry(self) -> str:
        """The name clients route by."""
        if self.name:
            return self.name
        host = urlsplit(self.url).netloc
        return "docker.io" if host in DOCKER_HUB_HOSTS else host


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication: off unless `htpasswd` is set."""

    htpasswd: Path | None = None
    anonymous_pull: bool = False
    token_ttl: float = 300.0
    signing_key_file: Path | None = None


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("./mirror-data")
    max_size: int | None = None  # bytes; least-recently-read blobs are evicted above it
    max_idle: float | None = None  # seconds; blobs not read for this long are evicted
    s3: S3Config | None = None  # a bucket behind the directory (then its local tier)


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = 600.0
    negative_ttl: float = 30.0
    stale_if_error: float = 7 * 86400.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"  # or "json": one object per line, for log shippers


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8083
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)  # the default one
    upstreams: tuple[UpstreamConfig, ...] = ()  # every other, routed by name
    public_url: str | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 30.0
    policy: Policy | None = None  # allow/deny globs and auth.rules; None: pull anything
    tls: TLSConfig | None = None  # the HTTPS listener (mirror/tls.py)
    http: bool = True  # the plain-HTTP listener on host:port; off with tls and no `listen`
    cluster: ClusterConfig | None = None  # replicas sharing Redis (mirror/cluster/)


def parse_size(key: str, value: object) -> int:
    """Bytes from `50GiB`, `500MB`, `10G` (powers of 1024 with `i`, of 1000 without)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size like 50GiB, got {value!r}")
    if isinstance(value, int | float):
        size = float(value)
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a size like 50GiB or 500MB, got {value!r}")
        unit = (match.group(2) or "").upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGTP".index(unit[0]) if unit and unit[0] != "B" else 0
        size = float(match.group(1)) * base**power
    if size <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return int(size)


def parse_duration(key: str, value: object) -> float:
    """Seconds from `30s`, `10m`, `2h`, `7d`, `1w`, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 30s or 10m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a duration like 30s or 10m, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError(key, f"must not be negative, got {value!r}")
    return seconds


def parse_listen(key: str, value: object) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) into its parts."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_url(key: str, value: object, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """An absolute URL with one of `schemes`, without a trailing slash."""
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(key, f"expected a {'/'.join(schemes)} URL, got {text!r}")
    return text.rstrip("/")


def _redis_url(key: str, value: object) -> str:
    """One of the Redis URL forms (a server, Sentinel, Cluster): see mirror/redistopology.py."""
    # Imported here: that module raises this module's ConfigError.
    from mirror.metadata.topology import validate_redis_url

    return validate_redis_url(key, value)


def _section(raw: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"expected a mapping, got {value!r}")
    _reject_unknown(value, allowed, prefix=f"{name}.")
    return dict(value)


def _reject_unknown(raw: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown key")


def _optional_str(key: str, value: object, *, secret: bool = False) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        shown = f"a {type(value).__name__}" if secret else repr(value)
        raise ConfigError(key, f"expected a string, got {shown}")
    return value


def _read_secret(key: str, path: object) -> str:
    try:
        return Path(str(path)).read_text().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None


UPSTREAM_KEYS = {
    "url", "name", "username", "password", "password_file", "password_command",
    "password_refresh", "connect_timeout", "read_timeout", "tag_ttl",
    "ca_file", "tls_verify", "client_cert_file", "client_key_file",
}  # fmt: skip


def _upstream(key: str, raw: object, name: str = "") -> UpstreamConfig:
    """One upstream entry, at `key` in the file (for error messages)."""
    from mirror.net.tls import parse_upstream_tls  # mirror.tls imports this module

    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping, got {raw!r}")
    _reject_unknown(raw, UPSTREAM_KEYS | {"allow", "deny"}, prefix=f"{key}.")  # policy.py
    sources = [k for k in ("password", "password_file", "password_command") if raw.get(k)]
    if len(sources) > 1:
        raise ConfigError(f"{key}.{sources[1]}", f"conflicts with {key}.{sources[0]}")
    password = _optional_str(f"{key}.password", raw.get("password"), secret=True)
    if raw.get("password_file") is not None:
        password = _read_secret(f"{key}.password_file", raw["password_file"])
    defaults = UpstreamConfig()

    def duration(field_name: str, default: float | None) -> float | None:
        value = raw.get(field_name, default)
        return None if value is None else parse_duration(f"{key}.{field_name}", value)

    return UpstreamConfig(
        url=parse_url(f"{key}.url", raw.get("url", defaults.url)),
        name=_optional_str(f"{key}.name", raw.get("name")) or name,
        username=_optional_str(f"{key}.username", raw.get("username")),
        password=password,
        password_command=_optional_str(f"{key}.password_command", raw.get("password_command")),
        password_refresh=duration("password_refresh", None),
        connect_timeout=duration("connect_timeout", defaults.connect_timeout) or 0.0,
        read_timeout=duration("read_timeout", defaults.read_timeout) or 0.0,
        tag_ttl=duration("tag_ttl", None),
        **parse_upstream_tls(key, raw),
    )


def _upstreams(raw: Mapping[str, Any]) -> tuple[UpstreamConfig, tuple[UpstreamConfig, ...]]:
    """(the default upstream, the others) from `upstream`, `upstreams`, `default_upstream`."""
    named = raw.get("upstreams") or {}
    if not isinstance(named, Mapping):
        raise ConfigError("upstreams", f"expected a mapping of name to upstream, got {named!r}")
    every = [_upstream(f"upstreams.{name}", entry, str(name)) for name, entry in named.items()]
    single = raw.get("upstream")
    if single is not None or not every:
        every.insert(0, _upstream("upstream", single or {}))
    names = [upstream.registry for upstream in every]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError("upstreams", f"two upstreams are named {name!r}")
    default = raw.get("default_upstream")
    if default is None:
        default = names[0] if single is not None or len(names) == 1 else "docker.io"
    if default not in names:
        raise ConfigError("default_upstream", f"names no configured upstream: {default!r}")
    chosen = every[names.index(default)]
    return chosen, tuple(upstream for upstream in every if upstream is not chosen)


def _auth(raw: Mapping[str, Any]) -> AuthConfig:
    keys = {"htpasswd", "anonymous_pull", "token_ttl", "signing_key_file", "groups", "rules"}
    sec = _section(raw, "auth", keys)  # groups and rules: parsed in policy.py
    anonymous = sec.get("anonymous_pull", False)
    if not isinstance(anonymous, bool):
        raise ConfigError("auth.anonymous_pull", f"expected true or false, got {anonymous!r}")
    htpasswd, key_file = sec.get("htpasswd"), sec.get("signing_key_file")
    if htpasswd is not None and not Path(str(htpasswd)).is_file():
        raise ConfigError("auth.htpasswd", f"no such file: {str(htpasswd)!r}")
    token_ttl = parse_duration("auth.token_ttl", sec.get("token_ttl", 300))
    if token_ttl < 1:  # token times are whole seconds
        raise ConfigError("auth.token_ttl", f"must be at least 1s, got {sec['token_ttl']!r}")
    return AuthConfig(
        htpasswd=None if htpasswd is None else Path(str(htpasswd)),
        anonymous_pull=anonymous,
        token_ttl=token_ttl,
        signing_key_file=None if key_file is None else Path(str(key_file)),
    )


def _storage(raw: Mapping[str, Any]) -> StorageConfig:
    from mirror.config.s3 import parse_s3  # here: the storage package imports us

    sec = _section(raw, "storage", {"path", "max_size", "max_idle", "s3"})
    max_size, max_idle = sec.get("max_size"), sec.get("max_idle")
    return StorageConfig(
        s3=parse_s3(sec.get("s3")),
        path=Path(str(sec.get("path", "./mirror-data"))),
        max_size=None if max_size is None else parse_size("storage.max_size", max_size),
        max_idle=None if max_idle is None else parse_duration("storage.max_idle", max_idle),
    )


def _cache(raw: Mapping[str, Any]) -> CacheConfig:
    sec = _section(raw, "cache", {"tag_ttl", "negative_ttl", "stale_if_error"})
    defaults = CacheConfig()
    return CacheConfig(
        **{
            name: parse_duration(f"cache.{name}", sec.get(name, getattr(defaults, name)))
            for name in ("tag_ttl", "negative_ttl", "stale_if_error")
        }
    )


def _log(raw: Mapping[str, Any]) -> LogConfig:
    sec = _section(raw, "log", {"level", "format"})
    level = str(sec.get("level", "INFO")).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    fmt = str(sec.get("format", "text")).lower()
    if fmt not in {"text", "json"}:
        raise ConfigError("log.format", f"expected text or json, got {fmt!r}")
    return LogConfig(level=level, format=fmt)


TOP_LEVEL_KEYS = {
    "listen", "upstream", "upstreams", "default_upstream", "public_url", "auth", "storage",
    "redis", "cache", "log", "shutdown_timeout", "tls", "cluster",
}  # fmt: skip


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Validate a parsed YAML document into a `Config`."""
    from mirror.net.tls import parse_tls  # mirror.tls imports this module

    _reject_unknown(raw, TOP_LEVEL_KEYS)
    tls = parse_tls(raw)
    # With tls set, plain HTTP listens only where `listen` says (both at once: a migration).
    http = tls is None or raw.get("listen") is not None
    if tls is None and "listen" in raw and raw["listen"] is None:
        raise ConfigError("listen", "null needs tls: nothing would listen")
    host, port = parse_listen("listen", raw.get("listen") or "0.0.0.0:8083")
    redis = _section(raw, "redis", {"url"})
    redis_url = redis.get("url")
    default, others = _upstreams(raw)
    public_url = raw.get("public_url")
    return Config(
        host=host,
        port=port,
        upstream=default,
        upstreams=others,
        public_url=None if public_url is None else parse_url("public_url", public_url),
        auth=_auth(raw),
        storage=_storage(raw),
        redis=RedisConfig(url=None if redis_url is None else _redis_url("redis.url", redis_url)),
        cache=_cache(raw),
        log=_log(raw),
        shutdown_timeout=parse_duration("shutdown_timeout", raw.get("shutdown_timeout", 30)),
        policy=_policy(raw, default, others),
        tls=tls,
        http=http,
        cluster=_cluster(raw),
    )


def _cluster(raw: Mapping[str, Any]) -> ClusterConfig | None:
    from mirror.config.cluster import parse_cluster  # it imports this module

    return parse_cluster(raw)


def _policy(
    raw: Mapping[str, Any], default: UpstreamConfig, others: tuple[UpstreamConfig, ...]
) -> Policy | None:
    from mirror.access.policy import parse_policy  # policy.py imports ConfigError from here

    return parse_policy(raw, default, others)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the YAML file at `path`; defaults when `path` is None."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("--config", f"{str(path)!r} is not valid YAML{where}") from None
    if raw is None:
        return Config()
    if not isinstance(raw, Mapping):
        raise ConfigError("--config", f"{str(path)!r} must hold a mapping, got {raw!r}")
    return config_from_mapping(raw)


def apply_overrides(
    config: Config,
    *,
    listen: str | None = None,
    upstream: str | None = None,
    storage: str | None = None,
    redis: str | None = None,
) -> Config:
    """Command-line flags win over the file."""
    if listen is not None:
        host, port = parse_listen("--listen", listen)
        config = replace(config, host=host, port=port, http=True)
    if upstream is not None:
        config = replace(
            config, upstream=replace(config.upstream, url=parse_url("--upstream", upstream))
        )
    if storage is not None:
        config = replace(config, storage=replace(config.storage, path=Path(storage)))
    if redis is not None:
        url = _redis_url("--redis", redis)
        config = replace(config, redis=RedisConfig(url=url))
    # Checked here, once the flags are in: the URL may come from --redis.
    if config.cluster is not None and config.redis.url is None:
        raise ConfigError(
            "cluster", "needs redis.url (or --redis): replicas share their state through Redis"
        )
    return config
