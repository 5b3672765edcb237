"""The `storage:` section: the cache directory, its bounds, and an optional bucket."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config.s3 import S3Config, parse_s3
from mirror.config.values import optional_path, parse_duration, parse_size, section

# The largest blob the mirror fetches, cached or relayed, unless storage.max_blob_size says
# otherwise. Not storage.max_size: a blob over that is relayed uncached (or kept in the
# bucket), which must keep working. Nor a share of the disk: relayed bytes take no disk.
# Above the largest layers registries accept (ECR: 52,000 MiB; GHCR: 10 GB), so no real
# image meets it, while an upstream streaming without end (no Content-Length) is cut there.
DEFAULT_MAX_BLOB_SIZE = 64 * 1024**3


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("./mirror-data")
    max_size: int | None = None  # bytes; least-recently-read blobs are evicted above it
    max_idle: float | None = None  # seconds; blobs not read for this long are evicted
    s3: S3Config | None = None  # a bucket behind the directory (then its local tier)
    # bytes; a larger upstream blob is refused (502), or cut where it has no length. None: none
    max_blob_size: int | None = DEFAULT_MAX_BLOB_SIZE


def parse_storage(raw: Mapping[str, Any]) -> StorageConfig:
    """`storage:` validated, with its `s3:` part."""
    sec = section(raw, "storage", {"path", "max_size", "max_idle", "s3", "max_blob_size"})
    max_size, max_idle = sec.get("max_size"), sec.get("max_idle")
    max_blob = sec.get("max_blob_size", DEFAULT_MAX_BLOB_SIZE)
    return StorageConfig(
        s3=parse_s3(sec.get("s3")),
        path=optional_path("storage.path", sec.get("path")) or StorageConfig.path,
        max_size=None if max_size is None else parse_size("storage.max_size", max_size),
        max_idle=None if max_idle is None else parse_duration("storage.max_idle", max_idle),
        max_blob_size=None if max_blob is None else parse_size("storage.max_blob_size", max_blob),
    )
