"""Leases in Redis: which replica does a piece of work that must happen once.

A lease is one key, `mirror:lease:<name>`, set with NX and an expiry, whose value names
the holder (`<advertise URL> <nonce>`), so that another replica knows whom to stream from.
The holder renews it every third of its TTL while the work runs; a holder that dies stops
renewing, and the lease runs out within one TTL for another replica to take over. Renewing
and releasing compare the value first (a small Lua script on that one key, so a Cluster
routes it by the key's slot): a holder that lost its lease never deletes a successor's.

A replica that stops deletes every lease it still holds (`release_all`, once requests in
flight are done): the work it could not finish is taken over at once, not one TTL later.

When Redis cannot be reached, `acquire` says so (None), and the caller works alone, as a
single mirror does: an outage costs duplicate upstream fetches, never a failed pull.
`LeaseBackoff` then stops asking for DOWN_RETRY, so an outage costs each request no wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from mirror.metadata.topology import DOWN_ERRORS, RedisClient

log = logging.getLogger(__name__)

LEASE_PREFIX = "mirror:lease:"
# Next to a lease, its holder's "<owner> <error class>" for one TTL: see cluster/shared.py.
FAILED_SUFFIX = "/failed"
# After Redis failed to answer, leases are not tried for this long: a Redis that drops
# packets (rather than refusing) would otherwise cost every miss a connect timeout.
DOWN_RETRY = 1.0
# The longest the commands of one turn may take (seconds), whatever the client's retries:
# then TimeoutError, taken as Redis down (a lease it may have set runs out by its TTL).
COMMAND_DEADLINE = 1.5
# Turns of a `Leases` not given its connection's (a pool of this size).
CONNECTIONS = 16
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Held:
    """Another replica holds the lease (or this process, `ours`: a lease it is letting go)."""

    owner: str  # its advertise URL
    ours: bool = False


class HeldLease(Protocol):
    """A lease this process holds, whatever keeps it (Redis, or a file lock)."""

    def kept(self) -> AbstractAsyncContextManager[object]: ...


L = TypeVar("L", bound=HeldLease, covariant=True)
LeaseT = TypeVar("LeaseT", bound=HeldLease)


class LeaseSource(Protocol[L]):
    """Where leases come from: Redis among replicas (`Leases`), file locks among the
    processes of one host (`cluster/locallease.py`)."""

    @property
    def owner(self) -> str: ...

    @property
    def ttl(self) -> float: ...

    async def acquire(self, name: str) -> L | Held | None: ...

    async def holder(self, name: str) -> str | None: ...

    async def mark_failed(self, name: str, error: str) -> None:
        """Say, for one TTL, that this holder's work on `name` failed with `error`."""

    async def failure(self, name: str) -> tuple[str, str] | None:
        """(holder, error class) of a recent failure marked on `name`, if any."""


class Lease:
    """A lease this replica holds; `kept()` renews it while a block runs."""

    def __init__(self, leases: Leases, key: str, value: str) -> None:
        self._leases = leases
        self.key = key
        self.value = value
        self.lost = asyncio.Event()  # set when a renewal found the lease gone or taken
        leases.held.add(self)

    async def renew(self) -> bool:
        """Extend the lease by one TTL; False if it is no longer ours (or Redis is down)."""
        try:
            async with self._leases.turn():
                done = await self._leases.client.eval(
                    _RENEW, 1, self.key, self.value, int(self._leases.ttl * 1000)
                )
        except DOWN_ERRORS:
            return False
        return bool(done)

    async def release(self) -> None:
        """Give the lease up, if it is still ours (never raises)."""
        self._leases.held.discard(self)
        with contextlib.suppress(*DOWN_ERRORS):
            # Shielded: a task cancelled again while it releases (a stopping replica
            # cancels its work) must not leave the lease to run out.
            await asyncio.shield(self._release())

    async def _release(self) -> None:
        async with self._leases.turn():
            await self._leases.client.eval(_RELEASE, 1, self.key, self.value)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[Lease]:
        """Renew every third of the TTL until the block ends; then release."""
        renewer = asyncio.create_task(self._renew_until_cancelled())
        try:
            yield self
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.release()

    async def _renew_until_cancelled(self) -> None:
        interval = self._leases.ttl / 3
        while True:
            await asyncio.sleep(interval)
            if not await self.renew():
                # Redis may only be slow or failing over: keep trying; another replica
                # can take the work over only once the TTL has passed anyway.
                if not self.lost.is_set():
                    log.warning("lease %s could not be renewed", self.key)
                self.lost.set()


class Leases:
    """Acquire leases in one Redis (any topology), as this replica."""

    def __init__(
        self,
        client: RedisClient,
        owner: str,
        ttl: float,
        turns: asyncio.Semaphore | None = None,
    ) -> None:
        self.client = client
        self.owner = owner
        self.ttl = ttl
        # In each lease's value after the URL: tells this process's leases from those of
        # another replica given the same advertise URL by mistake.
        self._process = secrets.token_hex(4)
        # Every command on `client` takes one of its connection's turns (topology.py):
        # a burst (a rollout's pulls) is never taken for an outage.
        self.turns = asyncio.Semaphore(CONNECTIONS) if turns is None else turns
        self.held: set[Lease] = set()  # taken and not yet released: `release_all` ends them

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """A turn on the connections, then COMMAND_DEADLINE for the commands sent in it
        (a Cluster that lost a master held an acquire 6 s); the wait for the turn is a
        burst, not an outage, and is not counted."""
        async with self.turns, asyncio.timeout(COMMAND_DEADLINE):
            yield

    async def release_all(self) -> int:
        """Release every lease still held (a stopping replica); how many there were."""
        held = list(self.held)
        await asyncio.gather(*(lease.release() for lease in held))
        return len(held)

    def key(self, name: str) -> str:
        return LEASE_PREFIX + name

    async def acquire(self, name: str) -> Lease | Held | None:
        """The lease on `name`: ours now, another replica's, or None when Redis is down."""
        key = self.key(name)
        value = f"{self.owner} {self._process}.{secrets.token_hex(8)}"
        try:
            async with self.turn():
                if await self.client.set(key, value, nx=True, px=int(self.ttl * 1000)):
                    return Lease(self, key, value)
                holder = await self.client.get(key)
        except DOWN_ERRORS as exc:
            log.debug("lease %s: redis unavailable (%s)", name, type(exc).__name__)
            return None
        if holder is None:  # released between the two calls: try once more
            return await self.acquire(name)
        owner, token = _parts(holder)
        return Held(owner, ours=token.startswith(self._process + "."))

    async def holder(self, name: str) -> str | None:
        """The advertise URL of the replica holding `name`, if any (None too when down)."""
        try:
            async with self.turn():
                value = await self.client.get(self.key(name))
        except DOWN_ERRORS:
            return None
        return None if value is None else _parts(value)[0]

    async def mark_failed(self, name: str, error: str) -> None:
        value = f"{self.owner} {error}"  # whose failure: a waiter follows one holder
        with contextlib.suppress(*DOWN_ERRORS):
            async with self.turn():
                await self.client.set(
                    self.key(name) + FAILED_SUFFIX, value, px=int(self.ttl * 1000)
                )

    async def failure(self, name: str) -> tuple[str, str] | None:
        with contextlib.suppress(*DOWN_ERRORS):
            async with self.turn():
                value = await self.client.get(self.key(name) + FAILED_SUFFIX)
            if value is not None:
                marked_by, _, error = str(value).partition(" ")
                return marked_by, error
        return None


class LeaseBackoff(Generic[LeaseT]):
    """`Leases.acquire`, but taking Redis as down (None) for DOWN_RETRY after it failed, and
    once the wait is over one call asking Redis again while the others go on without it."""

    def __init__(self, leases: LeaseSource[LeaseT]) -> None:
        self.leases = leases
        self._retry_at = 0.0  # monotonic time before which Redis is taken as down
        self._down = False
        self._probing = False

    async def acquire(self, name: str) -> LeaseT | Held | None:
        if self._down and (self._probing or time.monotonic() < self._retry_at):
            return None
        probing = self._down
        self._probing |= probing
        try:
            got = await self.leases.acquire(name)
        finally:
            if probing:
                self._probing = False
        self._down = got is None
        if got is None:
            self._retry_at = time.monotonic() + DOWN_RETRY
        return got


def _parts(value: str | bytes) -> tuple[str, str]:
    """A lease value's holder (its advertise URL) and token (`<process>.<nonce>`)."""
    text = value.decode() if isinstance(value, bytes) else value
    owner, _, token = text.partition(" ")
    return owner, token
