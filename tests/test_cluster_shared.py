"""SharedWork: one replica does a piece of work, the others wait for its result or take
over; on every Redis topology, with two replicas' lease clients in one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry, Counter

from mirror.cluster.lease import Lease, Leases
from mirror.cluster.shared import SharedFailure, SharedWork
from mirror.metadata.topology import open_redis
from mirror.observe.cluster_metrics import ClusterMetrics
from tests.redis_topologies import TOPOLOGIES, flushed_redis_url
from tests.services import free_port
from tests.workers_helpers import eventually

TTL = 1.0


def _counter() -> ClusterMetrics:
    return ClusterMetrics(CollectorRegistry())


def _count(metrics: ClusterMetrics, name: str) -> float:
    counter: Counter = getattr(metrics, name)
    return float(counter.labels("tag")._value.get())


@pytest.fixture(params=TOPOLOGIES)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Leases, Leases]]:
    url = flushed_redis_url(request, str(request.param))
    a = open_redis(url, 8, decode_responses=True)
    b = open_redis(url, 8, decode_responses=True)
    yield Leases(a.client, "http://a:1", TTL), Leases(b.client, "http://b:1", TTL)
    await a.close()
    await b.close()


class Result:
    """Where the holder writes what it found (the shared metadata store, in the mirror)."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.works = 0
        self.checks = 0

    async def check(self) -> str | None:
        self.checks += 1
        return self.value

    def work(
        self, value: str, hold: asyncio.Event | None = None, fail: bool = False
    ) -> Callable[[], Awaitable[str]]:
        """Work that ends once `hold` is set (at once without it)."""

        async def run() -> str:
            self.works += 1
            if hold is not None:
                await hold.wait()
            if fail:
                raise RuntimeError("upstream failed")
            self.value = value
            return value

        return run


async def holding(result: Result) -> None:
    """Until the first replica works (it holds the lease): a fresh client of a Sentinel or
    a Cluster can take a while to find its Redis, so no fixed sleep orders the two."""
    await eventually("the first replica's work", lambda: result.works == 1)


async def waiting(result: Result, waiter: asyncio.Task[str]) -> None:
    """Until the second replica asked for the holder's result (it waits), or gave up
    waiting: the holder asked once, before its work."""
    await eventually("the second replica", lambda: result.checks > 1 or waiter.done())


async def test_the_second_replica_waits_for_the_first_ones_result(
    pair: tuple[Leases, Leases],
) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], counter := _counter())
    result, done = Result(), asyncio.Event()
    first = asyncio.create_task(a.once("tag", "tag:x", result.check, result.work("from-a", done)))
    await holding(result)
    second = asyncio.create_task(b.once("tag", "tag:x", result.check, result.work("from-b")))
    await waiting(result, second)
    done.set()
    assert (await first, await second) == ("from-a", "from-a")
    assert result.works == 1
    assert _count(counter, "lease_waits") == 1


async def test_a_replica_arriving_after_the_release_uses_the_result_too(
    pair: tuple[Leases, Leases],
) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], _counter())
    result = Result()
    assert await a.once("tag", "tag:y", result.check, result.work("from-a")) == "from-a"
    # b read "nothing" before a finished, and takes the lease after a released it.
    assert await b.once("tag", "tag:y", result.check, result.work("from-b")) == "from-a"
    assert result.works == 1


async def test_a_failed_holder_lets_the_waiter_do_the_work(pair: tuple[Leases, Leases]) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], counter := _counter())
    result, done = Result(), asyncio.Event()
    failing = result.work("a", done, fail=True)
    first = asyncio.create_task(a.once("tag", "tag:z", result.check, failing))
    await holding(result)
    second = asyncio.create_task(b.once("tag", "tag:z", result.check, result.work("from-b")))
    await waiting(result, second)
    done.set()
    assert await second == "from-b"
    with pytest.raises(RuntimeError):
        await first
    assert _count(counter, "lease_takeovers") == 1


async def test_an_upstream_failure_of_the_holder_fails_its_waiters_without_a_retry(
    pair: tuple[Leases, Leases],
) -> None:
    failure = SharedFailure((TimeoutError,), lambda name: RuntimeError(f"holder: {name}"))
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], _counter())
    result, done = Result(), asyncio.Event()

    async def failing() -> str:
        result.works += 1
        await done.wait()
        raise TimeoutError

    first = asyncio.create_task(a.once("tag", "tag:down", result.check, failing, failure))
    await holding(result)
    work = result.work("from-b")
    second = asyncio.create_task(b.once("tag", "tag:down", result.check, work, failure))
    await waiting(result, second)
    done.set()
    with pytest.raises(RuntimeError, match="holder: TimeoutError"):
        await second
    with pytest.raises(TimeoutError):
        await first
    assert result.works == 1
    # A request that comes later is a new attempt, not a waiter: it asks again.
    assert await b.once("tag", "tag:down", result.check, result.work("b"), failure) == "b"


async def test_a_vanished_holders_lease_runs_out_and_the_waiter_takes_over(
    pair: tuple[Leases, Leases],
) -> None:
    dead = await pair[0].acquire("tag:gone")  # taken and never renewed: its replica died
    assert isinstance(dead, Lease)
    b = SharedWork(pair[1], counter := _counter())
    result = Result()
    assert await b.once("tag", "tag:gone", result.check, result.work("from-b")) == "from-b"
    assert _count(counter, "lease_takeovers") == 1


async def test_without_redis_each_replica_works_alone() -> None:
    conn = open_redis(f"redis://127.0.0.1:{free_port()}/0", 4, socket_connect_timeout=0.5)
    try:
        shared = SharedWork(Leases(conn.client, "http://a:1", TTL), counter := _counter())
        result = Result()
        assert await shared.once("tag", "t", result.check, result.work("alone")) == "alone"
        assert _count(counter, "lease_unavailable") == 1
    finally:
        await conn.close()
