"""The `cache:` section: how long tags, misses and stale answers are kept."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.config.values import parse_duration, section

CACHE_KEYS = ("tag_ttl", "negative_ttl", "stale_if_error")


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = 600.0
    negative_ttl: float = 30.0
    stale_if_error: float = 7 * 86400.0


def parse_cache(raw: Mapping[str, Any]) -> CacheConfig:
    """`cache:` validated; every key a duration."""
    sec = section(raw, "cache", set(CACHE_KEYS))
    defaults = CacheConfig()
    return CacheConfig(
        **{
            name: parse_duration(f"cache.{name}", sec.get(name, getattr(defaults, name)))
            for name in CACHE_KEYS
        }
    )
