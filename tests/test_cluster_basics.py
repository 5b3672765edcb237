"""Cluster foundations: leases on every Redis topology, signed peer requests, `cluster:`."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mirror.cluster import lease, peerauth
from mirror.cluster.blobflight import BlobFlight, lease_name
from mirror.cluster.lease import CONNECTIONS, Held, Lease, Leases
from mirror.cluster.peers import PeerClient
from mirror.config import ConfigError
from mirror.config.cluster import parse_cluster
from mirror.metadata.topology import open_redis
from mirror.observe.metrics import Metrics
from mirror.oci.reference import parse_digest
from mirror.web import peer
from tests.redis_topologies import TOPOLOGIES, flushed_redis_url
from tests.services import RedisServer, free_port

TTL = 1.0
DIGEST = parse_digest("sha256:" + "ab" * 32)


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest, topology: str
) -> AsyncIterator[tuple[Leases, Leases]]:
    """Two replicas' lease clients on one Redis."""
    url = flushed_redis_url(request, topology)
    a = open_redis(url, 8, decode_responses=True)
    b = open_redis(url, 8, decode_responses=True)
    yield Leases(a.client, "http://a:8083", TTL), Leases(b.client, "http://b:8083", TTL)
    await a.close()
    await b.close()


async def test_one_replica_holds_a_lease_and_the_other_sees_whom(
    replicas: tuple[Leases, Leases],
) -> None:
    a, b = replicas
    mine = await a.acquire("blob:sha256:aa")
    assert isinstance(mine, Lease)
    assert await b.acquire("blob:sha256:aa") == Held("http://a:8083")
    assert await b.holder("blob:sha256:aa") == "http://a:8083"
    await mine.release()
    assert isinstance(await b.acquire("blob:sha256:aa"), Lease)


async def test_a_burst_of_lease_calls_is_not_taken_for_an_outage(
    request: pytest.FixtureRequest, topology: str
) -> None:
    """A rollout asks for many leases at once. Sentinel's pool raises past its size rather
    than wait: each call past it used to read as Redis down (the work then done by every
    replica, and leases not asked for a second). All of them must reach Redis."""
    conn = open_redis(flushed_redis_url(request, topology), CONNECTIONS, decode_responses=True)
    leases = Leases(conn.client, "http://a:8083", 30.0)
    names = [f"blob:burst{n}" for n in range(200)]
    try:
        got = await asyncio.gather(*(leases.acquire(name) for name in names))
        holders = await asyncio.gather(*(leases.holder(name) for name in names))
        failures = await asyncio.gather(*(leases.failure(name) for name in names))
        released = await leases.release_all()
    finally:
        await conn.close()
    assert [type(lease) for lease in got] == [Lease] * len(names)
    assert holders == ["http://a:8083"] * len(names)
    assert failures == [None] * len(names)
    assert released == len(names)


async def test_a_kept_lease_outlives_its_ttl_and_a_dead_holders_runs_out(
    replicas: tuple[Leases, Leases],
) -> None:
    a, b = replicas
    kept = await a.acquire("kept")
    dead = await a.acquire("dead")  # never renewed: as if its replica were killed
    assert isinstance(kept, Lease) and isinstance(dead, Lease)
    async with kept.kept():
        await asyncio.sleep(TTL * 2)
        assert await b.acquire("kept") == Held("http://a:8083")
        assert not kept.lost.is_set()
    taken = await b.acquire("dead")
    assert isinstance(taken, Lease), "the dead holder's lease did not run out"
    assert await b.acquire("kept") is not None
    # The old holder's release must not delete the successor's lease.
    await dead.release()
    assert await a.acquire("dead") == Held("http://b:8083")


async def test_a_stopping_replica_releases_every_lease_it_still_holds(
    replicas: tuple[Leases, Leases],
) -> None:
    a, b = replicas
    first, second = await a.acquire("blob:sha256:aa"), await a.acquire("tag:x")
    done = await a.acquire("manifest:y")
    assert isinstance(first, Lease) and isinstance(second, Lease) and isinstance(done, Lease)
    await done.release()
    taken = await b.acquire("blob:sha256:aa")
    assert taken == Held("http://a:8083")

    assert await a.release_all() == 2
    # Another replica takes them at once, not one TTL later.
    assert isinstance(await b.acquire("blob:sha256:aa"), Lease)
    assert isinstance(await b.acquire("tag:x"), Lease)
    assert await a.release_all() == 0


async def test_redis_unreachable_means_work_alone() -> None:
    conn = open_redis(f"redis://127.0.0.1:{free_port()}/0", 4, socket_connect_timeout=0.5)
    try:
        leases = Leases(conn.client, "http://a:8083", TTL)
        assert await leases.acquire("anything") is None
        assert await leases.holder("anything") is None
    finally:
        await conn.close()


def test_signed_requests_are_checked_for_secret_path_and_age() -> None:
    secret = b"0123456789abcdef-shared"
    value = peerauth.sign(secret, "GET", "/_cluster/blobs/sha256:aa", now=1000)
    assert peerauth.verify(secret, value, "GET", "/_cluster/blobs/sha256:aa", now=1030)
    assert not peerauth.verify(
        b"another-secret-of-16b", value, "GET", "/_cluster/blobs/sha256:aa", now=1030
    )
    assert not peerauth.verify(secret, value, "GET", "/_cluster/blobs/sha256:bb", now=1030)
    assert not peerauth.verify(secret, value, "GET", "/_cluster/blobs/sha256:aa", now=1100)
    for junk in (
        None,
        "",
        "abc",
        "1000:",
        ":deadbeef",
        "\u00b2:00ff",
        "1000:\u00e9",
        "1000:\udcff",
        "1000:\ud800",
    ):
        assert not peerauth.verify(secret, junk, "GET", "/x", now=1000)


def test_cluster_section(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    got = parse_cluster(
        {"cluster": {"advertise_url": "http://10.0.0.5:8083/", "secret_file": str(secret)}}
    )
    assert got is not None
    assert (got.advertise_url, got.lease_ttl, got.replica_id) == (
        "http://10.0.0.5:8083",
        10.0,
        "10.0.0.5:8083",
    )
    assert "s" * 40 not in repr(got)
    assert parse_cluster({}) is None


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"advertise_url": "http://a:1", "secret_file": "SECRET", "color": 1}, "cluster.color"),
        ({"secret_file": "SECRET"}, "cluster.advertise_url"),
        ({"advertise_url": "ftp://a", "secret_file": "SECRET"}, "cluster.advertise_url"),
        ({"advertise_url": "http://a:1"}, "cluster.secret_file"),
        ({"advertise_url": "http://a:1", "secret_file": "/nonexistent"}, "cluster.secret_file"),
        ({"advertise_url": "http://a:1", "secret_file": "SHORT"}, "cluster.secret_file"),
        (
            {"advertise_url": "http://a:1", "secret_file": "SECRET", "lease_ttl": "0.1s"},
            "cluster.lease_ttl",
        ),
    ],
)
def test_bad_cluster_sections_name_the_key(
    tmp_path: Path, section: dict[str, str], key: str
) -> None:
    (tmp_path / "SECRET").write_text("x" * 32)
    (tmp_path / "SHORT").write_text("short")
    fixed = {
        k: str(tmp_path / v) if k == "secret_file" and v in ("SECRET", "SHORT") else v
        for k, v in section.items()
    }
    with pytest.raises(ConfigError) as raised:
        parse_cluster({"cluster": fixed})
    assert raised.value.key == key
    assert "x" * 32 not in str(raised.value)


@pytest.mark.parametrize("followed", [False, True], ids=["asked-only", "bytes-followed"])
async def test_a_lease_got_after_an_unanswering_owner_is_a_takeover_only_when_followed(
    request: pytest.FixtureRequest, followed: bool
) -> None:
    """An owner that stopped before this replica got any of its bytes (a rolling update's
    old replica closing its listener) leaves nothing to take over: the lease that follows
    is a fresh download, not counted in mirror_cluster_lease_takeovers_total."""
    url = flushed_redis_url(request, "single")
    here, gone = (
        open_redis(url, 8, decode_responses=True),
        open_redis(url, 8, decode_responses=True),
    )
    owner = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    metrics = Metrics()
    peers = PeerClient(b"s" * 32, metrics.cluster, 1, 5, advertise_url="http://127.0.0.1:8083")
    flight = BlobFlight(Leases(here.client, "http://127.0.0.1:8083", TTL), peers, metrics.cluster)
    try:
        held = await Leases(gone.client, owner, TTL).acquire(lease_name(DIGEST))
        assert isinstance(held, Lease)
        asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(held.release()))
        got = await flight.source(DIGEST, 0, owner if followed else None)
        assert isinstance(got, Lease)
        await got.release()
    finally:
        await peers.close()
        await here.close()
        await gone.close()
    takeovers = metrics.registry.get_sample_value(
        "mirror_cluster_lease_takeovers_total", {"kind": "blob"}
    )
    assert takeovers == (1 if followed else 0)


async def test_an_owner_refusing_this_replicas_signature_is_not_waited_for(
    request: pytest.FixtureRequest, aiohttp_server: Any
) -> None:
    """An owner with another cluster secret (a rotation) or a clock a minute off answers
    401 to every ask: the follower fetched the blob itself only after 3 lease TTLs (at
    least 30 s) of asking again. It now fetches it at once, and says why."""
    asked: list[str] = []

    async def refusing(req: web.Request) -> web.Response:
        asked.append(req.path)
        return web.Response(status=401)

    app = web.Application()
    app.router.add_get("/_cluster/blobs/{digest}", refusing)
    server = await aiohttp_server(app)
    owner = f"http://127.0.0.1:{server.port}"
    url = flushed_redis_url(request, "single")
    here, there = (open_redis(url, 8, decode_responses=True) for _ in range(2))
    metrics = Metrics()
    peers = PeerClient(b"s" * 32, metrics.cluster, 1, 5, advertise_url="http://127.0.0.1:8083")
    flight = BlobFlight(Leases(here.client, "http://127.0.0.1:8083", TTL), peers, metrics.cluster)
    try:
        held = await Leases(there.client, owner, TTL).acquire(lease_name(DIGEST))
        assert isinstance(held, Lease)
        async with held.kept():
            got = await asyncio.wait_for(flight.source(DIGEST, 0, None), 10 * TTL)
    finally:
        await peers.close()
        await here.close()
        await there.close()
    assert got is None and len(asked) == 1
    assert metrics.registry.get_sample_value("mirror_cluster_peer_rejected_total") == 1


async def test_a_replica_given_another_replicas_advertise_url_fetches_at_once(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas given one advertise_url (the load balancer's): the one not holding a
    blob's lease took the holder's for its own, waited 3 lease TTLs (at least 30 s) for it
    to end and asked nobody. It now fetches at once and names the mistake; this process's
    own lease still reads as its own."""
    shared = "http://mirror.lb:8083"
    url = flushed_redis_url(request, "single")
    one, other = (open_redis(url, 8, decode_responses=True) for _ in range(2))
    metrics = Metrics()
    peers = PeerClient(b"s" * 32, metrics.cluster, 1, 5, advertise_url=shared)
    mine = Leases(other.client, shared, TTL)
    flight = BlobFlight(mine, peers, metrics.cluster)
    try:
        theirs = Leases(one.client, shared, TTL)
        held = await theirs.acquire(lease_name(DIGEST))
        assert isinstance(held, Lease)
        assert await theirs.acquire(lease_name(DIGEST)) == Held(shared, ours=True)
        assert await mine.acquire(lease_name(DIGEST)) == Held(shared)
        async with held.kept():
            got = await asyncio.wait_for(flight.source(DIGEST, 0, None), 10 * TTL)
    finally:
        await peers.close()
        await one.close()
        await other.close()
    assert got is None
    assert metrics.registry.get_sample_value("mirror_cluster_owners_refused_total") == 1
    assert "each replica needs an address of its own" in caplog.text


@pytest.mark.parametrize(
    ("value", "offset"),
    [("bytes=100-", 100), ("bytes=\u00b2-", 0), ("bytes=" + "9" * 5000 + "-", 0), ("", 0)],
)
def test_a_peer_range_start_is_ascii_digits_or_nothing(value: str, offset: int) -> None:
    """A signed peer's Range start: "²" passed str.isdigit() and int() refused it (a 500)."""
    request = make_mocked_request("GET", "/_cluster/blobs/x", headers={"Range": value})
    assert peer._offset(request) == offset


class _FailingLeases:
    """A lease source whose Redis fails each acquire after a while: calls counted."""

    def __init__(self) -> None:
        self.asked = 0

    async def acquire(self, name: str) -> Lease | Held | None:
        self.asked += 1
        await asyncio.sleep(0.2)
        return None  # Redis down


async def test_once_redis_is_taken_as_down_one_acquire_at_a_time_asks_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the wait after a failure is over, one acquire asks Redis again while the others
    go on without a lease at once (before, every request in flight waited on it together,
    each second)."""
    monkeypatch.setattr(lease, "DOWN_RETRY", 0.0)
    failing = _FailingLeases()
    backoff = lease.LeaseBackoff(failing)
    assert await backoff.acquire("tag:a") is None
    probe = asyncio.ensure_future(backoff.acquire("tag:b"))
    await asyncio.sleep(0)  # the probe is asking Redis
    others = [backoff.acquire(f"tag:{i}") for i in range(4)]
    assert await asyncio.wait_for(asyncio.gather(*others), timeout=0.1) == [None] * 4
    assert await probe is None
    assert failing.asked == 2


async def test_a_lease_from_a_redis_that_never_answers_costs_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the client's own timeouts and retries (a Cluster that lost a master held
    an acquire 6 s; here a client with no socket timeout of ours, which gives up after
    5 s), an acquire is held to COMMAND_DEADLINE, then Redis is taken as down and the work
    goes on without a lease."""
    monkeypatch.setattr(lease, "COMMAND_DEADLINE", 0.3)
    with RedisServer(tmp_path / "redis") as server:
        conn = open_redis(server.url, 4, decode_responses=True)  # no socket timeout
        try:
            leases = Leases(conn.client, "http://a:8083", TTL)
            assert await conn.client.ping()
            os.kill(server.pid, signal.SIGSTOP)
            try:
                # redis-py's own default gives up after 5 s: the deadline, well before
                assert await asyncio.wait_for(leases.acquire("tag:x"), timeout=3) is None
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            await conn.close()
