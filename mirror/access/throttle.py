"""Failed logins counted per user name at each client address, and per address, so that
nobody can guess passwords quickly and one user's failures lock out no other user.

Each (address, user name) pair and each address has a leaky bucket: a failure adds one
to both, and each drains at its own rate. A login whose pair or address bucket is full is
refused before any password is checked (no bcrypt work), until enough has drained. Room
is taken before the check and given back when the login succeeds (or could not be
checked), so that checks in flight together cannot pass the burst. The tables are LRUs of
bounded size: a flood of addresses or names forgets the oldest, it never grows memory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror.util.lru import LRU

# Per user name at one address: ten wrong passwords at once, then one every six seconds. A
# person who mistypes is never stopped; a guesser gets ~14,400 tries a day at one name.
BURST = 10
RATE = 1 / 6
# Per address, whatever the names: six names' worth. Six logins left stale at one address
# (CI jobs with an old password, Docker Hub logins sent along with every pull) fit in it
# while each waits at its own bound; an address trying name after name gets one try a
# second (one bcrypt check, ~5-25% of one of the pool's threads) however many it knows.
ADDRESS_BURST = 60
ADDRESS_RATE = 1.0
ADDRESSES = 10_000
PAIRS = 50_000


@dataclass(frozen=True, slots=True)
class Throttled:
    """Why a login may not be checked now, and for how long more."""

    retry_after: int
    # The user name's own bound at this address (not only the address's): the name has
    # failed there `burst` times already.
    user: bool


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


class _Buckets:
    """Leaky buckets by key, in an LRU."""

    def __init__(self, burst: int, rate: float, size: int, clock: Callable[[], float]) -> None:
        self._burst = burst
        self._rate = rate
        self._clock = clock
        self._table: LRU[str, _Bucket] = LRU(size)

    def level(self, key: str) -> float:
        bucket = self._table.get(key)
        if bucket is None:
            return 0.0
        return max(0.0, bucket.level - (self._clock() - bucket.at) * self._rate)

    def wait(self, key: str) -> int:
        """Seconds until the bucket has room for one more; 0 when it has now."""
        excess = self.level(key) - self._burst + 1
        return 0 if excess <= 0 else max(1, math.ceil(excess / self._rate))

    def add(self, key: str, amount: float) -> None:
        level = max(0.0, self.level(key) + amount)
        if level or self._table.get(key) is not None:
            self._table.put(key, _Bucket(level, self._clock()))

    def __len__(self) -> int:
        return len(self._table)


class FailureThrottle:
    """Which user names at which addresses, and which addresses, have failed to log in
    too often, and for how long more."""

    def __init__(
        self,
        burst: int = BURST,
        rate: float = RATE,
        address_burst: int = ADDRESS_BURST,
        address_rate: float = ADDRESS_RATE,
        addresses: int = ADDRESSES,
        pairs: int = PAIRS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pairs = _Buckets(burst, rate, pairs, clock)
        self._addresses = _Buckets(address_burst, address_rate, addresses, clock)

    def check(self, address: str, user: str) -> Throttled | None:
        """Throttled when a login as `user` from `address` may not be checked now."""
        at = holder(address)
        pair = self._pairs.wait(_pair(at, user))
        wait = max(pair, self._addresses.wait(at))
        return Throttled(wait, user=pair > 0) if wait else None

    def reserve(self, address: str, user: str) -> Throttled | None:
        """`check`, and when it passes, one failure counted ahead of the password check
        (`release` gives it back)."""
        throttled = self.check(address, user)
        if throttled is None:
            self._add(address, user, 1)
        return throttled

    def release(self, address: str, user: str) -> None:
        """Give back what `reserve` took: the login was good, or was never checked."""
        self._add(address, user, -1)

    def _add(self, address: str, user: str, amount: float) -> None:
        at = holder(address)
        self._pairs.add(_pair(at, user), amount)
        self._addresses.add(at, amount)

    def __len__(self) -> int:
        """Addresses remembered."""
        return len(self._addresses)


def _pair(at: str, user: str) -> str:
    # The name hashed: a client picks it, and it may be as long as a request header.
    name = hashlib.blake2b(user.encode(), digest_size=16).hexdigest()
    return f"{at} {name}"


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
