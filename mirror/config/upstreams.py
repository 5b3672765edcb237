"""The upstream registries: `upstream`, `upstreams` and `default_upstream`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.config.tls import parse_upstream_tls
from mirror.config.values import (
    ConfigError,
    kind,
    optional_str,
    parse_duration,
    parse_url,
    read_secret,
    reject_unknown,
)

DEFAULT_UPSTREAM = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})
# Docker Hub's token service is on a host of its own.
DOCKER_HUB_AUTH_HOST = "auth.docker.io"
UPSTREAM_KEYS = {
    "url", "name", "username", "password", "password_file", "password_command",
    "password_refresh", "connect_timeout", "read_timeout", "tag_ttl",
    "ca_file", "tls_verify", "client_cert_file", "client_key_file",
    "auth_hosts", "redirect_hosts",
}  # fmt: skip
POLICY_KEYS = {"allow", "deny"}  # an upstream's pull lists: mirror/config/policy.py


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
    # TLS to this upstream (mirror/net/tls.py): an extra CA, the check, a client pair (mTLS).
    ca_file: Path | None = None
    tls_verify: bool = True
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    # Hosts (host, or host:port) besides the upstream's own that may be its token realm
    # and get its credentials; None: auth.docker.io for Docker Hub, none for others.
    auth_hosts: tuple[str, ...] | None = None
    # Hosts (host, or host:port) its redirects may lead to although not public addresses.
    redirect_hosts: tuple[str, ...] = ()

    @property
    def realm_hosts(self) -> tuple[str, ...]:
        """Hosts besides its own where its token realm may be: `auth_hosts` as set, else
        auth.docker.io for Docker Hub."""
        if self.auth_hosts is not None:
            return self.auth_hosts
        hub = urlsplit(self.url).hostname in DOCKER_HUB_HOSTS
        return (DOCKER_HUB_AUTH_HOST,) if hub else ()

    @property
    def registry(self) -> str:
        """The name clients route by."""
        if self.name:
            return self.name
        host = urlsplit(self.url).netloc
        return "docker.io" if host in DOCKER_HUB_HOSTS else host


def parse_upstream(key: str, raw: object, name: str = "") -> UpstreamConfig:
    """One upstream entry, at `key` in the file (for error messages)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping, got {kind(raw)}")
    reject_unknown(raw, UPSTREAM_KEYS | POLICY_KEYS, prefix=f"{key}.")
    sources = [k for k in ("password", "password_file", "password_command") if raw.get(k)]
    if len(sources) > 1:
        raise ConfigError(f"{key}.{sources[1]}", f"conflicts with {key}.{sources[0]}")
    password = optional_str(f"{key}.password", raw.get("password"), secret=True)
    if raw.get("password_file") is not None:
        password = read_secret(f"{key}.password_file", raw["password_file"])
    defaults = UpstreamConfig()

    def duration(field_name: str, default: float | None) -> float | None:
        value = raw.get(field_name, default)
        return None if value is None else parse_duration(f"{key}.{field_name}", value)

    return UpstreamConfig(
        url=parse_upstream_url(f"{key}.url", raw.get("url", defaults.url)),
        name=optional_str(f"{key}.name", raw.get("name")) or name,
        username=optional_str(f"{key}.username", raw.get("username")),
        password=password,
        password_command=optional_str(f"{key}.password_command", raw.get("password_command")),
        password_refresh=duration("password_refresh", None),
        connect_timeout=_timeout(key, "connect_timeout", raw, defaults.connect_timeout),
        read_timeout=_timeout(key, "read_timeout", raw, defaults.read_timeout),
        tag_ttl=duration("tag_ttl", None),
        auth_hosts=None if raw.get("auth_hosts") is None else parse_hosts(key, "auth_hosts", raw),
        redirect_hosts=parse_hosts(key, "redirect_hosts", raw),
        **parse_upstream_tls(key, raw),
    )


def _timeout(key: str, name: str, raw: Mapping[str, Any], default: float) -> float:
    """A timeout of more than 0: at 0 every pull fails at once, or aiohttp waits for ever."""
    value = raw.get(name, default)
    seconds = parse_duration(f"{key}.{name}", value)
    if seconds <= 0:
        raise ConfigError(f"{key}.{name}", f"must be more than 0, got {value!r}")
    return seconds


def parse_upstreams(raw: Mapping[str, Any]) -> tuple[UpstreamConfig, tuple[UpstreamConfig, ...]]:
    """(the default upstream, the others) from `upstream`, `upstreams`, `default_upstream`."""
    named = raw.get("upstreams") or {}
    if not isinstance(named, Mapping):
        raise ConfigError("upstreams", f"expected a mapping of name to upstream, got {kind(named)}")
    every = [parse_upstream(f"upstreams.{name}", entry, str(name)) for name, entry in named.items()]
    single = raw.get("upstream")
    if single is not None or not every:
        every.insert(0, parse_upstream("upstream", single or {}))
    names = check_names("upstreams", every)
    default = raw.get("default_upstream")
    if default is None:
        default = names[0] if single is not None or len(names) == 1 else "docker.io"
        if default not in names:  # not the user's word: say what is missing
            raise ConfigError(
                "default_upstream",
                f"required with several upstreams and none for docker.io (have: "
                f"{', '.join(map(repr, names))})",
            )
    if default not in names:
        raise ConfigError("default_upstream", f"names no configured upstream: {default!r}")
    chosen = every[names.index(default)]
    return chosen, tuple(upstream for upstream in every if upstream is not chosen)


def check_names(key: str, every: Sequence[UpstreamConfig]) -> list[str]:
    """The upstreams' registry names; ConfigError at `key` when two are the same."""
    names = [upstream.registry for upstream in every]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(key, f"two upstreams are named {name!r}")
    return names


def override_upstream(
    current: UpstreamConfig, others: Sequence[UpstreamConfig], url: str
) -> UpstreamConfig:
    """The default upstream once `--upstream` (or MIRROR_UPSTREAM) names `url`. The same
    registry (scheme and host:port) keeps its entry; another gets a fresh one, with none of
    the file's account, TLS settings, hosts, lists or name: those were written for the
    file's registry, and its password must never reach another. Its timeouts and tag TTL
    say how long to wait and to trust, not whom: those stay."""
    if same_registry(url, current.url):
        chosen = replace(current, url=url)
    else:
        chosen = UpstreamConfig(
            url=url,
            connect_timeout=current.connect_timeout,
            read_timeout=current.read_timeout,
            tag_ttl=current.tag_ttl,
        )
    check_names("--upstream", [chosen, *others])
    return chosen


def same_registry(url: str, other: str) -> bool:
    """Whether two upstream URLs reach the same registry the same way (scheme, host:port)."""
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower())


def parse_upstream_url(key: str, value: object) -> str:
    """An upstream's URL, refused (without echoing it) when it holds credentials: they
    would end up in logs, metric labels and the status page."""
    if "@" in str(value):
        raise ConfigError(
            key, "must not hold credentials (user:password@): use username and password_file"
        )
    return parse_url(key, value)


def parse_hosts(key: str, name: str, raw: Mapping[str, Any]) -> tuple[str, ...]:
    """A list of `host` or `host:port` (lower-cased), at `key.name`."""
    value = raw.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}.{name}", f"expected a list of host or host:port, got {value!r}")
    return tuple(_host(f"{key}.{name}", entry) for entry in value)


def _host(key: str, entry: object) -> str:
    text = str(entry).strip().lower() if isinstance(entry, str) else ""
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or not parts.hostname or parts.netloc != text or "@" in text:
        raise ConfigError(key, f"expected host or host:port (no scheme, no path), got {entry!r}")
    if port == 0:
        raise ConfigError(key, f"port out of range in {entry!r}")
    return text
