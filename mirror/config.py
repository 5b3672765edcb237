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
from typing import Any
from urllib.parse import urlsplit

import yaml

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


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = DEFAULT_UPSTREAM
    username: str | None = None
    # repr=False keeps the secret out of any log line that prints the config.
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("./mirror-data")
    max_size: int | None = None  # bytes; least-recently-read blobs are evicted above it
    max_idle: float | None = None  # seconds; blobs not read for this long are evicted


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


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8083
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 30.0


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


def _upstream(raw: Mapping[str, Any]) -> UpstreamConfig:
    allowed = {"url", "username", "password", "password_file", "connect_timeout", "read_timeout"}
    sec = _section(raw, "upstream", allowed)
    password = _optional_str("upstream.password", sec.get("password"), secret=True)
    if sec.get("password_file") is not None:
        password = _read_secret("upstream.password_file", sec["password_file"])
    defaults = UpstreamConfig()
    return UpstreamConfig(
        url=parse_url("upstream.url", sec.get("url", defaults.url)),
        username=_optional_str("upstream.username", sec.get("username")),
        password=password,
        connect_timeout=parse_duration(
            "upstream.connect_timeout", sec.get("connect_timeout", defaults.connect_timeout)
        ),
        read_timeout=parse_duration(
            "upstream.read_timeout", sec.get("read_timeout", defaults.read_timeout)
        ),
    )


def _storage(raw: Mapping[str, Any]) -> StorageConfig:
    sec = _section(raw, "storage", {"path", "max_size", "max_idle"})
    max_size, max_idle = sec.get("max_size"), sec.get("max_idle")
    return StorageConfig(
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
    sec = _section(raw, "log", {"level"})
    level = str(sec.get("level", "INFO")).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    return LogConfig(level=level)


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Validate a parsed YAML document into a `Config`."""
    _reject_unknown(
        raw, {"listen", "upstream", "storage", "redis", "cache", "log", "shutdown_timeout"}
    )
    host, port = parse_listen("listen", raw.get("listen", "0.0.0.0:8083"))
    redis = _section(raw, "redis", {"url"})
    redis_url = redis.get("url")
    return Config(
        host=host,
        port=port,
        upstream=_upstream(raw),
        storage=_storage(raw),
        redis=RedisConfig(
            url=None
            if redis_url is None
            else parse_url("redis.url", redis_url, ("redis", "rediss", "unix"))
        ),
        cache=_cache(raw),
        log=_log(raw),
        shutdown_timeout=parse_duration("shutdown_timeout", raw.get("shutdown_timeout", 30)),
    )


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
        config = replace(config, host=host, port=port)
    if upstream is not None:
        config = replace(
            config, upstream=replace(config.upstream, url=parse_url("--upstream", upstream))
        )
    if storage is not None:
        config = replace(config, storage=replace(config.storage, path=Path(storage)))
    if redis is not None:
        url = parse_url("--redis", redis, ("redis", "rediss", "unix"))
        config = replace(config, redis=RedisConfig(url=url))
    return config
