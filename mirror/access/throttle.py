"""Failed logins counted per client address, so that nobody can guess passwords quickly.

Each address has a leaky bucket: a failure adds one, and one drains every `1/rate` seconds.
An address whose bucket is full is refused before any password is checked (no bcrypt work),
until enough has drained. Successes add nothing and are never delayed. The table is an LRU
of bounded size: a flood of addresses forgets the oldest, it never grows memory.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror.util.lru import LRU

# Ten wrong passwords at once, then one every six seconds: a person who mistypes is never
# stopped, a guesser gets ~14,400 tries a day per address instead of millions.
BURST = 10
RATE = 1 / 6
ADDRESSES = 10_000


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


class FailureThrottle:
    """Which addresses have failed to log in too often, and for how long more."""

    def __init__(
        self,
        burst: int = BURST,
        rate: float = RATE,
        addresses: int = ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._rate = rate
        self._clock = clock
        self._buckets: LRU[str, _Bucket] = LRU(addresses)

    def _level(self, address: str) -> float:
        bucket = self._buckets.get(holder(address))
        if bucket is None:
            return 0.0
        return max(0.0, bucket.level - (self._clock() - bucket.at) * self._rate)

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again; 0 when it may now."""
        excess = self._level(address) - self._burst + 1
        return 0 if excess <= 0 else max(1, math.ceil(excess / self._rate))

    def failed(self, address: str) -> None:
        """Count one failed login from `address`."""
        self._buckets.put(holder(address), _Bucket(self._level(address) + 1, self._clock()))

    def __len__(self) -> int:
        return len(self._buckets)


def holder(address: str) -> str:
    """Whose failures an address counts towards: an IPv6 address's /64 (one host or LAN
    holds a whole /64, so counting single addresses would let it try 2**64 times)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
