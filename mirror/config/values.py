"""`ConfigError` and the parsers of single values: durations, sizes, URLs, listen addresses."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """A configuration key has a bad value; the message names both."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key


def parse_size(key: str, value: object) -> int:
    """Bytes from `50GiB`, `500MB`, `10G` (powers of 1024 with `i`, of 1000 without)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size like 50GiB, got {value!r}")
    if isinstance(value, int | float):
        size = float(value)
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a size like 50GiB or 500MB, got {value!r}")
        unit = (match.group(2) or "").upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGTP".index(unit[0]) if unit and unit[0] != "B" else 0
        size = float(match.group(1)) * base**power
    if not math.isfinite(size):  # YAML's .nan and .inf
        raise ConfigError(key, f"expected a size like 50GiB, got {value!r}")
    if size <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return int(size)


def parse_duration(key: str, value: object) -> float:
    """Seconds from `30s`, `10m`, `2h`, `7d`, `1w`, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 30s or 10m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a duration like 30s or 10m, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds):  # YAML's .nan and .inf: every comparison would pass
        raise ConfigError(key, f"expected a duration like 30s or 10m, got {value!r}")
    if seconds < 0:
        raise ConfigError(key, f"must not be negative, got {value!r}")
    return seconds


def parse_listen(key: str, value: object) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) into its parts."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    if not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_url(key: str, value: object, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """An absolute URL with one of `schemes`, without a trailing slash."""
    text = str(value)
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # an unclosed [ of an IPv6 address, say
        raise ConfigError(key, f"{exc}, in {text!r}") from None
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(key, f"expected a {'/'.join(schemes)} URL, got {text!r}")
    try:  # checked here, or every request to it fails, well after a start that looked fine
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(key, f"expected a port from 1 to 65535, got {text!r}")
    return text.rstrip("/")


def section(raw: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    """The top-level mapping `name` ({} when absent or null), its keys checked."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"expected a mapping, got {kind(value)}")
    reject_unknown(value, allowed, prefix=f"{name}.")
    return dict(value)


def reject_unknown(raw: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    """ConfigError for the first key of `raw` not in `allowed` (a typo fails, never ignored)."""
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown key")


def kind(value: object) -> str:
    """A value named by its type alone (`a str`), for a section or document of the wrong
    type: it may be a secret put in the wrong place (a URL with a password, a key file)."""
    return f"a {type(value).__name__}"


def optional_str(key: str, value: object, *, secret: bool = False) -> str | None:
    """A string or None; a secret's wrong value is named by its type only."""
    if value is None:
        return None
    if not isinstance(value, str):
        shown = kind(value) if secret else repr(value)
        raise ConfigError(key, f"expected a string, got {shown}")
    return value


def optional_path(key: str, value: object) -> Path | None:
    """A file or directory name, or None; a list, number or boolean is no path."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a path, got {value!r}")
    return Path(value)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(key: str, value: object) -> tuple[Network, ...]:
    """A list of IP addresses and CIDR blocks (`10.0.0.0/8`, `::1`)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of addresses or CIDRs, got {value!r}")
    networks = []
    for index, item in enumerate(value):
        networks.append(_network(f"{key}[{index}]", item))
    return tuple(networks)


def _network(key: str, item: object) -> Network:
    # A string only: ip_network would take YAML's number 10 as 0.0.0.10.
    if isinstance(item, str):
        try:
            return ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            pass
    raise ConfigError(key, f"not an address or CIDR: {item!r}")


def read_secret(key: str, path: object) -> str:
    """The stripped text of a secret's file; ConfigError naming `key` when unreadable."""
    try:
        return Path(str(path)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its bytes are never shown: they may be the secret
        raise ConfigError(key, f"{str(path)!r} is not UTF-8 text") from None
