"""Work one replica does for all: a lease per piece of work, the others wait for its result.

A tag revalidation or a manifest fetch is wanted by every replica a client asks; the first
to take the lease `name` asks the upstream and writes the result where every replica reads
(the tag record in Redis, the manifest in the shared storage). The others poll for that
result instead of asking too, and take the work over if the lease ends without one (its
holder failed or died). Without Redis there is no lease: each replica works alone, as a
single mirror does (the per-process single flight still coalesces its own clients).

A holder whose work failed in a way the others would repeat (the upstream is down) says so
with a marker next to the lease, for one TTL: its waiters then fail alike at once (and serve
a stale tag) instead of each asking the failing upstream in turn, one timeout after another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mirror.cluster.lease import Held, HeldLease, LeaseBackoff, LeaseSource
from mirror.observe.cluster_metrics import ClusterMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# Polls for another replica's result: quick at first (a tag HEAD takes tens of ms), then
# every 100 ms: a waiter answers at most that long after the holder, for two Redis GETs
# per poll (one waiting task per replica and name: the local single flight).
POLL_FIRST = 0.02
POLL_MAX = 0.1
# A holder that keeps its lease but never writes a result (a hung upstream request) is
# waited for this many lease TTLs at most; then this replica does the work itself.
WAIT_TTLS = 3
MIN_WAIT = 30.0

Check = Callable[[], Awaitable[T | None]]
Work = Callable[[], Awaitable[T]]


@dataclass(frozen=True)
class SharedFailure:
    """Failures of the holder its waiters take as theirs: `kinds` raised by the work;
    `make(name of the holder's exception class)`, the error each waiter raises instead."""

    kinds: tuple[type[Exception], ...]
    make: Callable[[str], Exception]


class SharedWork:
    """Runs `work` on one replica at a time per name; `check` finds a replica's result."""

    def __init__(self, leases: LeaseSource[HeldLease] | None, metrics: ClusterMetrics) -> None:
        self._backoff = None if leases is None else LeaseBackoff(leases)
        self._metrics = metrics

    @property
    def enabled(self) -> bool:
        return self._backoff is not None

    async def once(
        self,
        kind: str,
        name: str,
        check: Check[T],
        work: Work[T],
        failure: SharedFailure | None = None,
    ) -> T:
        """The result of `work()`, done here under the lease on `name`, or another
        replica's as `check()` finds it (None: not there yet)."""
        backoff = self._backoff
        if backoff is None:
            return await work()
        leases = backoff.leases
        give_up = time.monotonic() + max(WAIT_TTLS * leases.ttl, MIN_WAIT)
        waited = False
        while True:
            got = await backoff.acquire(name)
            if got is None:  # Redis down: work alone, as a single mirror does
                self._metrics.lease_unavailable.labels(kind).inc()
                return await work()
            if not isinstance(got, Held):
                return await self._as_owner(kind, name, got, check, work, waited, failure)
            waited = True
            found = await self._wait(kind, leases, name, got.owner, check, give_up, failure)
            if found is not None:
                self._metrics.lease_waits.labels(kind).inc()
                return found
            if time.monotonic() >= give_up:
                log.warning("%s: held by %s for too long; doing it here", name, got.owner)
                return await work()
            # The lease ended with no result: take it (loop), unless another replica did.

    async def _as_owner(
        self,
        kind: str,
        name: str,
        lease: HeldLease,
        check: Check[T],
        work: Work[T],
        waited: bool,
        failure: SharedFailure | None,
    ) -> T:
        async with lease.kept():
            # Another replica may have finished between our read and our lease.
            found = await check()
            if found is not None:
                self._metrics.lease_waits.labels(kind).inc()
                return found
            if waited:  # the holder died (or failed alone) without a result
                self._metrics.lease_takeovers.labels(kind).inc()
            try:
                return await work()
            except Exception as exc:
                if failure is not None and isinstance(exc, failure.kinds):
                    # Before the release, so no waiter misses it.
                    assert self._backoff is not None
                    await self._backoff.leases.mark_failed(name, type(exc).__name__)
                raise

    async def _wait(
        self,
        kind: str,
        leases: LeaseSource[HeldLease],
        name: str,
        owner: str,
        check: Check[T],
        give_up: float,
        failure: SharedFailure | None,
    ) -> T | None:
        """Poll for the holder's result until it is there (it), or the lease ends (None);
        raise what `failure` makes when the holder (`owner`) marked its work failed."""
        delay = POLL_FIRST
        while time.monotonic() < give_up:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
            found = await check()
            if found is not None:
                return found
            holder = await leases.holder(name)
            if holder is not None:
                owner = holder  # another replica may hold it now: follow that one
                continue
            # Released or run out; the result may have landed just before the release.
            found = await check()
            if found is None and failure is not None:
                marked = await leases.failure(name)
                if marked is not None and marked[0] == owner:  # the holder followed
                    self._metrics.lease_waits.labels(kind).inc()
                    raise failure.make(marked[1])
            return found
        return None
