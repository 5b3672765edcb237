"""The `log:` section: the level and the line format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mirror.config.values import ConfigError, section


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"  # or "json": one object per line, for log shippers


def parse_log(raw: Mapping[str, Any]) -> LogConfig:
    """`log:` validated; the level upper-cased, the format lower-cased."""
    sec = section(raw, "log", {"level", "format"})
    level = str(sec.get("level", "INFO")).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    fmt = str(sec.get("format", "text")).lower()
    if fmt not in {"text", "json"}:
        raise ConfigError("log.format", f"expected text or json, got {fmt!r}")
    return LogConfig(level=level, format=fmt)
