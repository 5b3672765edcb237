"""The `server:` section: how long a client may take to ask and to read, and how many may be
connected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.config.values import ConfigError, parse_duration, section

SERVER_KEYS = {"header_timeout", "keepalive_timeout", "send_timeout", "max_connections"}
TIMEOUTS = ("header_timeout", "keepalive_timeout", "send_timeout")


@dataclass(frozen=True)
class ServerConfig:
    """Limits on client connections (mirror/web/connections.py)."""

    # A request head must be complete within this of the connection opening (its TLS
    # handshake included, on HTTPS), or of the head's first byte on a kept-alive one.
    header_timeout: float = 10.0
    # A kept-alive connection that sends nothing closes after this.
    # Above a load balancer's own idle timeout (HAProxy's http-request 30s), so the
    # balancer closes first and never sends on a connection the mirror is closing.
    keepalive_timeout: float = 75.0
    # A connection whose client takes none of the bytes sent to it for this long is cut
    # (between bytes, not for the whole answer: a slow reader is never cut). nginx's
    # send_timeout, and its default.
    send_timeout: float = 60.0
    # Open connections at most; those waiting longest for an unfinished head make room.
    max_connections: int = 4096


def parse_server(raw: Mapping[str, Any]) -> ServerConfig:
    """`server:` validated: positive durations, a positive whole number of connections."""
    sec = section(raw, "server", SERVER_KEYS)
    defaults = ServerConfig()
    timeouts = {
        name: parse_duration(f"server.{name}", sec.get(name, getattr(defaults, name)))
        for name in TIMEOUTS
    }
    for name, seconds in timeouts.items():
        if seconds <= 0:
            raise ConfigError(f"server.{name}", f"must be more than 0, got {sec[name]!r}")
    limit = sec.get("max_connections", defaults.max_connections)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError("server.max_connections", f"expected a number 1 or more, got {limit!r}")
    return ServerConfig(max_connections=limit, **timeouts)
