"""The `cluster:` section: how this replica is reached and how replicas know each other."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirror.config.values import ConfigError, parse_duration, parse_url

CLUSTER_KEYS = {
    "advertise_url", "secret_file", "lease_ttl", "replica_id", "ca_file", "cert_file", "key_file",
}  # fmt: skip
MIN_SECRET_BYTES = 16
# `${NAME}` in advertise_url and replica_id: a pod learns its own IP and name only from its
# environment (the downward API), and one config file serves every replica.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ClusterConfig:
    advertise_url: str  # how the other replicas reach this one
    secret: bytes = field(repr=False)  # shared by every replica; never logged
    lease_ttl: float = 10.0
    # Names this replica in metrics and logs; default: the advertise URL's host:port.
    replica_id: str = ""
    # For replicas reached over HTTPS: the CA their certificates must chain to (besides the
    # system's), and the pair this replica presents to a listener that wants one (mTLS).
    ca_file: Path | None = None
    client_pair: tuple[Path, Path] | None = None


def parse_cluster(raw: Mapping[str, Any]) -> ClusterConfig | None:
    """`cluster:` validated; None when absent or null (a single replica)."""
    section = raw.get("cluster")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError("cluster", f"expected a mapping, got {type(section).__name__}")
    for name in section:
        if name not in CLUSTER_KEYS:
            raise ConfigError(f"cluster.{name}", "unknown key")
    if "advertise_url" not in section:
        raise ConfigError("cluster.advertise_url", "required: how other replicas reach this one")
    if "secret_file" not in section:
        raise ConfigError("cluster.secret_file", "required: the secret shared by all replicas")
    advertise = _expand_env("cluster.advertise_url", section["advertise_url"])
    url = parse_url("cluster.advertise_url", advertise).rstrip("/")
    ttl = parse_duration("cluster.lease_ttl", section.get("lease_ttl", "10s"))
    if ttl < 1:
        raise ConfigError("cluster.lease_ttl", f"must be at least 1s, got {section['lease_ttl']!r}")
    replica_id = _expand_env("cluster.replica_id", section.get("replica_id"))
    replica_id = replica_id or url.split("://", 1)[1]
    ca_file = _optional_file("cluster.ca_file", section.get("ca_file"))
    cert = _optional_file("cluster.cert_file", section.get("cert_file"))
    key = _optional_file("cluster.key_file", section.get("key_file"))
    if (cert is None) != (key is None):
        missing = "cluster.key_file" if key is None else "cluster.cert_file"
        raise ConfigError(missing, "required with the other half of the client pair")
    pair = (cert, key) if cert is not None and key is not None else None
    secret = _read_secret(section["secret_file"])
    return ClusterConfig(url, secret, ttl, str(replica_id), ca_file, pair)


def _optional_file(key: str, value: object) -> Path | None:
    """A readable file's path, or None when the key is absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a file path, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(key, f"{value!r} is not a readable file")
    return path


def _expand_env(key: str, value: object) -> object:
    """`value` with each `${NAME}` replaced by that environment variable, which must be set."""
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if not found:
            raise ConfigError(key, f"environment variable {match.group(1)} is not set")
        return found

    return _ENV_REF.sub(lookup, value)


def _read_secret(path: object) -> bytes:
    key = "cluster.secret_file"
    try:
        with open(str(path), "rb") as file:
            secret = file.read().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        # The file's content is never shown, only its length.
        raise ConfigError(key, f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def new_secret() -> str:
    """A secret for `cluster.secret_file` (what the deploy docs tell users to generate)."""
    return secrets.token_urlsafe(32)
