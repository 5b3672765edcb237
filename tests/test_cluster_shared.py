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

    async def check(self) -> str | None:
        return self.value

    def work(
        self, value: str, delay: float = 0.3, fail: bool = False
    ) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.works += 1
            await asyncio.sleep(delay)
            if fail:
                raise RuntimeError("upstream failed")
            self.value = value
            return value

        return run


async def test_the_second_replica_waits_for_the_first_ones_result(
    pair: tuple[Leases, Leases],
) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], counter := _counter())
    result = Result()
    first = asyncio.create_task(a.once("tag", "tag:x", result.check, result.work("from-a")))
    await asyncio.sleep(0.1)  # a holds the lease now
    second = await b.once("tag", "tag:x", result.check, result.work("from-b"))
    assert (await first, second) == ("from-a", "from-a")
    assert result.works == 1
    assert _count(counter, "lease_waits") == 1


async def test_a_replica_arriving_after_the_release_uses_the_result_too(
    pair: tuple[Leases, Leases],
) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], _counter())
    result = Result()
    assert await a.once("tag", "tag:y", result.check, result.work("from-a", 0)) == "from-a"
    # b read "nothing" before a finished, and takes the lease after a released it.
    assert await b.once("tag", "tag:y", result.check, result.work("from-b", 0)) == "from-a"
    assert result.works == 1


async def test_a_failed_holder_lets_the_waiter_do_the_work(pair: tuple[Leases, Leases]) -> None:
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], counter := _counter())
    result = Result()
    first = asyncio.create_task(a.once("tag", "tag:z", result.check, result.work("a", fail=True)))
    await asyncio.sleep(0.1)
    assert await b.once("tag", "tag:z", result.check, result.work("from-b")) == "from-b"
    with pytest.raises(RuntimeError):
        await first
    assert _count(counter, "lease_takeovers") == 1


async def test_an_upstream_failure_of_the_holder_fails_its_waiters_without_a_retry(
    pair: tuple[Leases, Leases],
) -> None:
    failure = SharedFailure((TimeoutError,), lambda name: RuntimeError(f"holder: {name}"))
    a, b = SharedWork(pair[0], _counter()), SharedWork(pair[1], _counter())
    result = Result()

    async def failing() -> str:
        result.works += 1
        await asyncio.sleep(0.3)
        raise TimeoutError

    first = asyncio.create_task(a.once("tag", "tag:down", result.check, failing, failure))
    await asyncio.sleep(0.1)
    with pytest.raises(RuntimeError, match="holder: TimeoutError"):
        await b.once("tag", "tag:down", result.check, result.work("from-b"), failure)
    with pytest.raises(TimeoutError):
        await first
    assert result.works == 1
    # A request that comes later is a new attempt, not a waiter: it asks again.
    assert await b.once("tag", "tag:down", result.check, result.work("b", 0), failure) == "b"


async def test_a_vanished_holders_lease_runs_out_and_the_waiter_takes_over(
    pair: tuple[Leases, Leases],
) -> None:
    dead = await pair[0].acquire("tag:gone")  # taken and never renewed: its replica died
    assert isinstance(dead, Lease)
    b = SharedWork(pair[1], counter := _counter())
    result = Result()
    assert await b.once("tag", "tag:gone", result.check, result.work("from-b", 0)) == "from-b"
    assert _count(counter, "lease_takeovers") == 1


async def test_without_redis_each_replica_works_alone() -> None:
    conn = open_redis(f"redis://127.0.0.1:{free_port()}/0", 4, socket_connect_timeout=0.5)
    try:
        shared = SharedWork(Leases(conn.client, "http://a:1", TTL), counter := _counter())
        result = Result()
        assert await shared.once("tag", "t", result.check, result.work("alone", 0)) == "alone"
        assert _count(counter, "lease_unavailable") == 1
    finally:
        await conn.close()
