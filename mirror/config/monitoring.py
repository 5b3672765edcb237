"""The `metrics:` section: where `/metrics` and the status page `/` are served, and to whom."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.config.values import ConfigError, parse_listen, section


@dataclass(frozen=True)
class MetricsConfig:
    """null listen: on the client listeners, as every other path; set: there only."""

    listen: tuple[str, int] | None = None
    require_auth: bool = False  # with auth.htpasswd: a logged-in user only


def parse_metrics(raw: Mapping[str, Any]) -> MetricsConfig:
    """`metrics:` validated; require_auth needs auth.htpasswd (else nobody could log in)."""
    sec = section(raw, "metrics", {"listen", "require_auth"})
    listen = sec.get("listen")
    require_auth = sec.get("require_auth", False)
    if not isinstance(require_auth, bool):
        raise ConfigError("metrics.require_auth", f"expected true or false, got {require_auth!r}")
    auth = raw.get("auth") or {}
    if require_auth and auth.get("htpasswd") is None:
        raise ConfigError("metrics.require_auth", "needs auth.htpasswd: the users who may look")
    return MetricsConfig(
        listen=None if listen is None else parse_listen("metrics.listen", listen),
        require_auth=require_auth,
    )
