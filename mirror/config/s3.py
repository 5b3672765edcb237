"""The `storage.s3` section: a bucket the cache lives in, behind the local directory."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mirror.config.values import (
    ConfigError,
    kind,
    parse_duration,
    parse_size,
    parse_url,
    read_secret,
)

S3_KEYS = {
    "endpoint", "bucket", "region", "prefix", "path_style", "access_key_id",
    "secret_access_key", "secret_access_key_file", "redirect", "redirect_ttl", "max_size",
    "evict_grace",
}  # fmt: skip
# S3's bucket naming rules (lower case, digits, dots and hyphens, 3 to 63 characters).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A presigned URL lives at most 7 days (SigV4).
MAX_REDIRECT_TTL = 7 * 86400.0
MAX_EVICT_GRACE = 86400.0


@dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint: str | None = None  # None: AWS's own endpoint for the region
    region: str = "us-east-1"
    prefix: str = ""
    path_style: bool = True
    # repr=False keeps the keys out of any log line that prints the config. Both None:
    # the standard AWS chain (environment, shared credentials file, instance or pod role).
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    redirect: bool = False
    redirect_ttl: float = 600.0
    max_size: int | None = None
    # Replicas: how long after another replica's last stream of an object from the bucket
    # its eviction leaves the object (a client resuming with a Range finds it still there).
    evict_grace: float = 300.0


def parse_s3(raw: object) -> S3Config | None:
    """`storage.s3` from the file; None (the default) keeps the cache in the directory."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("storage.s3", f"expected a mapping, got {kind(raw)}")
    for key in raw:
        if key not in S3_KEYS:
            raise ConfigError(f"storage.s3.{key}", "unknown key")
    endpoint = raw.get("endpoint")
    return S3Config(
        bucket=_bucket(raw.get("bucket")),
        endpoint=None if endpoint is None else parse_url("storage.s3.endpoint", endpoint),
        region=_text("region", raw.get("region", "us-east-1")),
        prefix=_prefix(raw.get("prefix", "")),
        path_style=_flag("path_style", raw.get("path_style", True)),
        **_credentials(raw),
        redirect=_flag("redirect", raw.get("redirect", False)),
        redirect_ttl=_redirect_ttl(raw.get("redirect_ttl", 600)),
        max_size=None
        if raw.get("max_size") is None
        else parse_size("storage.s3.max_size", raw["max_size"]),
        evict_grace=_evict_grace(raw.get("evict_grace", 300)),
    )


def _bucket(value: object) -> str:
    if value is None:
        raise ConfigError("storage.s3.bucket", "required when storage.s3 is set")
    if not isinstance(value, str) or not _BUCKET.match(value):
        raise ConfigError("storage.s3.bucket", f"not a valid bucket name: {value!r}")
    return value


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"storage.s3.{key}", f"expected a string, got {value!r}")
    return value


def _prefix(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or value.startswith("/"):
        raise ConfigError(
            "storage.s3.prefix", f"expected a key prefix like 'mirror/', got {value!r}"
        )
    return value


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"storage.s3.{key}", f"expected true or false, got {value!r}")
    return value


def _redirect_ttl(value: object) -> float:
    seconds = parse_duration("storage.s3.redirect_ttl", value)
    if not 1 <= seconds <= MAX_REDIRECT_TTL:
        raise ConfigError("storage.s3.redirect_ttl", f"must be from 1s to 7d, got {value!r}")
    return seconds


def _evict_grace(value: object) -> float:
    seconds = parse_duration("storage.s3.evict_grace", value)
    if not 0 <= seconds <= MAX_EVICT_GRACE:
        raise ConfigError("storage.s3.evict_grace", f"must be from 0s to 1d, got {value!r}")
    return seconds


def _credentials(raw: Mapping[str, Any]) -> dict[str, str | None]:
    """The key pair, or neither (the AWS chain); the secret never appears in a message."""
    key_id = raw.get("access_key_id")
    secret, secret_file = raw.get("secret_access_key"), raw.get("secret_access_key_file")
    if secret is not None and secret_file is not None:
        raise ConfigError(
            "storage.s3.secret_access_key_file", "conflicts with storage.s3.secret_access_key"
        )
    if secret is not None and not isinstance(secret, str):
        raise ConfigError(
            "storage.s3.secret_access_key", f"expected a string, got a {type(secret).__name__}"
        )
    if secret_file is not None:
        secret = read_secret("storage.s3.secret_access_key_file", secret_file)
    if key_id is not None and not isinstance(key_id, str):
        raise ConfigError("storage.s3.access_key_id", f"expected a string, got {key_id!r}")
    if (key_id is None) != (secret is None):
        missing = "secret_access_key" if secret is None else "access_key_id"
        raise ConfigError(f"storage.s3.{missing}", "set both keys, or neither (the AWS chain)")
    return {"access_key_id": key_id, "secret_access_key": secret}
