"""The whole configuration: the YAML file, then command-line overrides, into one `Config`.

Every problem raises `ConfigError` naming the key and the bad value, so the CLI can print one
line and exit 2 before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mirror.config.auth import AuthConfig, parse_auth
from mirror.config.cache import CacheConfig, parse_cache
from mirror.config.cluster import ClusterConfig, parse_cluster
from mirror.config.cpus import usable_cpus
from mirror.config.log import LogConfig, parse_log
from mirror.config.monitoring import MetricsConfig, parse_metrics
from mirror.config.policy import PolicyConfig, parse_policy, policy_for_fresh_default
from mirror.config.redis import RedisConfig, parse_redis, redis_section, validate_redis_url
from mirror.config.server import ServerConfig, parse_server
from mirror.config.storage import StorageConfig, parse_storage
from mirror.config.tls import TLSConfig, parse_tls
from mirror.config.upstreams import (
    UpstreamConfig,
    override_upstream,
    parse_upstream_url,
    parse_upstreams,
    same_registry,
)
from mirror.config.values import (
    ConfigError,
    Network,
    kind,
    parse_duration,
    parse_listen,
    parse_networks,
    parse_url,
    reject_unknown,
)

TOP_LEVEL_KEYS = {
    "listen", "upstream", "upstreams", "default_upstream", "public_url", "auth", "storage",
    "redis", "cache", "log", "shutdown_timeout", "shutdown_delay", "tls", "cluster", "server",
    "workers", "event_loop", "trusted_proxies", "metrics",
}  # fmt: skip
EVENT_LOOPS = ("auto", "asyncio", "uvloop")


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
    # On SIGTERM, /readyz answers 503 this long before the listeners close (web/server.py).
    shutdown_delay: float = 0.0
    # Allow/deny globs and auth.rules, checked; None: pull anything. The app compiles it.
    policy: PolicyConfig | None = None
    tls: TLSConfig | None = None  # the HTTPS listener (mirror/net/tls.py)
    http: bool = True  # the plain-HTTP listener on host:port; off with tls and no `listen`
    cluster: ClusterConfig | None = None  # replicas sharing Redis (mirror/cluster/)
    server: ServerConfig = field(default_factory=ServerConfig)  # client connection limits
    workers: int = 1  # processes serving the same port and cache directory
    event_loop: str = "auto"  # uvloop where installed, or asyncio, or uvloop (web/server.py)
    # Peers whose X-Forwarded-For/-Proto/-Host are believed (mirror/net/proxies.py).
    trusted_proxies: tuple[Network, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Validate a parsed YAML document into a `Config`."""
    reject_unknown(raw, TOP_LEVEL_KEYS)
    tls = parse_tls(raw)
    # With tls set, plain HTTP listens only where `listen` says (both at once: a migration).
    http = tls is None or raw.get("listen") is not None
    if tls is None and "listen" in raw and raw["listen"] is None:
        raise ConfigError("listen", "null needs tls: nothing would listen")
    host, port = parse_listen("listen", raw.get("listen") or "0.0.0.0:8083")
    redis = redis_section(raw)
    default, others = parse_upstreams(raw)
    public_url = raw.get("public_url")
    return Config(
        host=host,
        port=port,
        upstream=default,
        upstreams=others,
        public_url=None if public_url is None else parse_url("public_url", public_url),
        auth=parse_auth(raw),
        storage=parse_storage(raw),
        redis=parse_redis(redis),
        cache=parse_cache(raw),
        log=parse_log(raw),
        shutdown_timeout=parse_duration("shutdown_timeout", raw.get("shutdown_timeout", 30)),
        shutdown_delay=parse_duration("shutdown_delay", raw.get("shutdown_delay", 0)),
        policy=parse_policy(raw, default, others),
        tls=tls,
        http=http,
        cluster=parse_cluster(raw),
        server=parse_server(raw),
        workers=parse_workers(raw.get("workers", 1), clustered=raw.get("cluster") is not None),
        event_loop=_event_loop(raw),
        trusted_proxies=parse_networks("trusted_proxies", raw.get("trusted_proxies")),
        metrics=parse_metrics(raw),
    )


def _event_loop(raw: Mapping[str, Any]) -> str:
    value = str(raw.get("event_loop", "auto")).lower()
    if value not in EVENT_LOOPS:
        raise ConfigError("event_loop", f"expected auto, asyncio or uvloop, got {value!r}")
    return value


# Past this, workers cost more in memory and cache-lock contention than any host gains.
MAX_WORKERS = 64


def parse_workers(value: object, clustered: bool = False) -> int:
    """`workers`: a count of processes, or `auto` for one per CPU this process may use
    (its affinity, and its cgroup's quota: a container's CPU limit)."""
    if value == "auto":
        count = min(MAX_WORKERS, usable_cpus())
    elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError("workers", f"{value!r} is not auto or a count from 1 to {MAX_WORKERS}")
    else:
        count = value
    # A replica is one process to its peers: its leases and its in-flight downloads, which
    # they stream from, would be split over workers that do not see each other's.
    if clustered and count > 1:
        raise ConfigError("workers", f"{value!r} with cluster: a replica runs one process")
    return count


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the YAML file at `path`; defaults when `path` is None."""
    if path is None:
        return Config()
    return config_from_text(read_config_text(path), path)


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The config file's text, or a ConfigError naming --config."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{str(path)!r} is not UTF-8 text") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping: PyYAML keeps the last,
    so a second `storage:` would silently drop the first one's max_size."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            # `<<: *anchor` merges keys an entry may override: that is what it is for.
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ConfigError(key.value, f"given twice (lines {seen[key.value]} and {line})")
            seen[key.value] = line
        return super().construct_mapping(node, deep)


def config_from_text(text: str, path: str | os.PathLike[str]) -> Config:
    """Validate a config file's YAML text (read from `path`, which errors name)."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # safe_load's loader, stricter
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("--config", f"{str(path)!r} is not valid YAML{where}") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise ConfigError("--config", f"{str(path)!r} is nested too deeply") from None
    if raw is None:
        return Config()
    if not isinstance(raw, Mapping):
        raise ConfigError("--config", f"{str(path)!r} must hold a mapping, got {kind(raw)}")
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
        config = _with_upstream(config, parse_upstream_url("--upstream", upstream))
    if storage is not None:
        if not storage.strip():  # refused as in the file: "" would be the working directory
            raise ConfigError("--storage", f"expected a path, got {storage!r}")
        config = replace(config, storage=replace(config.storage, path=Path(storage)))
    if redis is not None:
        url = validate_redis_url("--redis", redis)
        config = replace(config, redis=RedisConfig(url=url))
    # Checked here, once the flags are in: the URL may come from --redis.
    if config.cluster is not None and config.redis.url is None:
        raise ConfigError(
            "cluster", "needs redis.url (or --redis): replicas share their state through Redis"
        )
    return config


def _with_upstream(config: Config, url: str) -> Config:
    """`--upstream`: the default upstream at `url` (mirror/config/upstreams.py says when the
    file's entry is kept), and the policy checked again against the upstreams left."""
    chosen = override_upstream(config.upstream, config.upstreams, url)
    policy = config.policy
    if not same_registry(url, config.upstream.url):
        policy = policy_for_fresh_default(policy, chosen, config.upstreams)
    return replace(config, upstream=chosen, policy=policy)
