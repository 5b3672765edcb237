"""The `auth:` section: client authentication, off unless `htpasswd` is set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config.values import ConfigError, parse_duration, section

# `groups` and `rules` are the pull policy's: mirror/config/policy.py.
AUTH_KEYS = {"htpasswd", "anonymous_pull", "token_ttl", "signing_key_file", "groups", "rules"}


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication: off unless `htpasswd` is set."""

    htpasswd: Path | None = None
    anonymous_pull: bool = False
    token_ttl: float = 300.0
    signing_key_file: Path | None = None


def parse_auth(raw: Mapping[str, Any]) -> AuthConfig:
    """`auth:` validated; the htpasswd file must exist."""
    sec = section(raw, "auth", AUTH_KEYS)
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
