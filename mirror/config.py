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


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = 600.0


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


def _log(raw: Mapping[str, Any]) -> LogConfig:
    sec = _section(raw, "log", {"level"})
    level = str(sec.get("level", "INFO")).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    return LogConfig(level=level)


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Validate a parsed YAML document into a `Config`."""
    _reject_unknown(raw, {"listen", "upstream", "storage", "redis", "cache", "log"})
    host, port = parse_listen("listen", raw.get("listen", "0.0.0.0:8083"))
    storage = _section(raw, "storage", {"path"})
    redis = _section(raw, "redis", {"url"})
    cache = _section(raw, "cache", {"tag_ttl"})
    redis_url = redis.get("url")
    return Config(
        host=host,
        port=port,
        upstream=_upstream(raw),
        storage=StorageConfig(path=Path(str(storage.get("path", "./mirror-data")))),
        redis=RedisConfig(
            url=None
            if redis_url is None
            else parse_url("redis.url", redis_url, ("redis", "rediss", "unix"))
        ),
        cache=CacheConfig(tag_ttl=parse_duration("cache.tag_ttl", cache.get("tag_ttl", 600))),
        log=_log(raw),
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
        config = replace(config, storage=StorageConfig(path=Path(storage)))
    if redis is not None:
        url = parse_url("--redis", redis, ("redis", "rediss", "unix"))
        config = replace(config, redis=RedisConfig(url=url))
    return config
