"""The file locks that make worker processes one mirror, tested within one process.

A `flock` taken through one open file conflicts with one taken through another open of the
same file, in one process as across processes: two apps here behave as two workers.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.cache import downloads
from mirror.cluster import locallease
from mirror.cluster.lease import Held
from mirror.cluster.locallease import LocalLease, LocalLeases
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import Digest, parse_digest
from mirror.storage import localflight
from mirror.storage.localflight import (
    FAILED_FOR,
    Claim,
    Gone,
    LocalFlight,
    Progress,
    Sibling,
    sweep,
)
from mirror.web.keys import metrics_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.workers_helpers import eventually

DIGEST = parse_digest("sha256:" + "ab" * 32)


async def test_a_local_lease_is_held_once_and_free_after_release(tmp_path: Path) -> None:
    leases = LocalLeases(tmp_path / "locks")
    lease = await leases.acquire("tag:hub/library/x:latest")
    assert isinstance(lease, LocalLease)
    assert await leases.acquire("tag:hub/library/x:latest") == Held(leases.owner)
    assert await leases.holder("tag:hub/library/x:latest") == leases.owner
    assert isinstance(await leases.acquire("tag:hub/library/y:latest"), LocalLease)
    async with lease.kept():
        pass
    assert await leases.holder("tag:hub/library/x:latest") is None
    assert isinstance(await leases.acquire("tag:hub/library/x:latest"), LocalLease)


async def test_a_local_failure_marker_names_its_holder_and_runs_out(tmp_path: Path) -> None:
    leases = LocalLeases(tmp_path / "locks", ttl=0.2)
    await leases.mark_failed("tag:t", "UpstreamUnavailable")
    assert await leases.failure("tag:t") == (leases.owner, "UpstreamUnavailable")
    await asyncio.sleep(0.3)
    assert await leases.failure("tag:t") is None


async def test_a_lease_whose_holder_name_the_disk_refused_is_still_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock was taken, then writing the holder's name failed (a full disk): the
    descriptor was lost with the lock on it, and every process found the name held until
    that worker restarted (each tag revalidation waited 30 s for a holder that never was)."""
    leases = LocalLeases(tmp_path / "locks")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(locallease.os, "pwrite", full)
        lease = await leases.acquire("tag:hub/library/x:latest")
    assert isinstance(lease, LocalLease)
    async with lease.kept():
        pass
    again = await LocalLeases(tmp_path / "locks").acquire("tag:hub/library/x:latest")
    assert isinstance(again, LocalLease)
    again.release()


async def test_markers_past_their_ttl_and_dead_holders_files_are_swept(tmp_path: Path) -> None:
    """Lease names come from clients: each tag asked for that does not exist left a
    `.failed` marker for good, and a holder that died left its file."""
    locks = tmp_path / "locks"
    leases = LocalLeases(locks, ttl=0.2)
    for n in range(30):
        await leases.mark_failed(f"tag:hub/library/x:nope{n}", "ManifestUnknown")
    dead = await leases.acquire("tag:hub/library/dead:1")
    assert isinstance(dead, LocalLease) and dead._fd is not None
    os.close(dead._fd)  # as the kernel does for a process that died holding it
    live = await leases.acquire("tag:hub/library/live:1")
    assert isinstance(live, LocalLease)
    await asyncio.sleep(0.3)
    assert await LocalLeases(locks, ttl=0.2).sweep() == 31
    assert sorted(p.name for p in locks.iterdir()) == [live.path.name]
    assert await leases.holder("tag:hub/library/live:1") == leases.owner
    live.release()


def test_a_follower_reads_the_owners_progress_until_it_lets_go(tmp_path: Path) -> None:
    flight = LocalFlight(tmp_path)
    owner = flight.claim(DIGEST)
    assert isinstance(owner, Claim) and owner.previous is None
    follower = flight.claim(DIGEST)
    assert isinstance(follower, Sibling)
    assert follower.poll() is None  # no temp file yet
    temp = tmp_path / "blob-1"
    temp.write_bytes(b"x" * 10)
    owner.start(temp, 10)
    owner.progress(6)
    assert follower.poll() == Progress(temp, 10, 6, False)
    owner.progress(10)
    owner.verified()
    assert follower.poll() == Progress(temp, 10, 10, True)
    owner.release()
    assert isinstance(follower.poll(), Gone)


def test_a_dead_owners_download_is_taken_over_where_it_stopped(tmp_path: Path) -> None:
    flight = LocalFlight(tmp_path)
    owner = flight.claim(DIGEST)
    assert isinstance(owner, Claim)
    follower = flight.claim(DIGEST)
    assert isinstance(follower, Sibling)
    temp = tmp_path / "blob-1"
    temp.write_bytes(b"x" * 10)
    owner.start(temp, 100)
    owner.progress(10)
    assert owner._fd is not None
    os.close(owner._fd)  # as the kernel does for a killed process: unlocked, not unlinked
    taken = follower.poll()
    assert isinstance(taken, Claim)
    assert taken.previous == Progress(temp, 100, 10, False)
    assert isinstance(flight.claim(DIGEST), Sibling)  # the new owner holds it
    taken.release()


def test_a_dead_owners_download_past_its_size_is_not_taken_over(tmp_path: Path) -> None:
    flight = LocalFlight(tmp_path)
    owner = flight.claim(DIGEST)
    follower = flight.claim(DIGEST)
    assert isinstance(owner, Claim) and isinstance(follower, Sibling)
    temp = tmp_path / "blob-1"
    temp.write_bytes(b"x" * 150)
    owner.start(temp, 100)
    owner.progress(150)
    assert owner._fd is not None
    os.close(owner._fd)  # its process died
    taken = follower.poll()
    assert isinstance(taken, Claim) and taken.previous is None  # fetched afresh
    taken.release()


def test_a_starting_process_sweeps_only_what_no_live_download_holds(tmp_path: Path) -> None:
    flight = LocalFlight(tmp_path)
    live = flight.claim(DIGEST)
    assert isinstance(live, Claim)
    (tmp_path / "blob-live").write_bytes(b"x")
    live.start(tmp_path / "blob-live", 1)
    dead = flight.claim(parse_digest("sha256:" + "cd" * 32))
    assert isinstance(dead, Claim)
    (tmp_path / "blob-dead").write_bytes(b"x")
    dead.start(tmp_path / "blob-dead", 1)
    assert dead._fd is not None
    os.close(dead._fd)  # its process died
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blob-live",
        f"sha256-{DIGEST.hex}.lock",
    ]
    live.release()


def test_failure_markers_that_ran_out_do_not_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digests come from clients: a failing upstream left a marker per digest asked until
    the next start. One read past FAILED_FOR removes it, and claims sweep the others."""
    flight = LocalFlight(tmp_path)
    digests = [parse_digest(f"sha256:{n:064x}") for n in range(20)]
    for digest in digests:
        claim = flight.claim(digest)
        assert isinstance(claim, Claim)
        claim.failed("UpstreamUnavailable", "timed out")
        claim.release()
    markers = sorted(tmp_path.glob("*.failed"))
    assert len(markers) == 20
    old = time.time() - FAILED_FOR - 1
    for marker in markers:
        os.utime(marker, (old, old))
    assert flight.failure(digests[0]) is None
    assert not markers[0].exists()
    _claim_and_release(flight, digests[1])  # within SWEEP_EVERY of the start: no pass
    assert len(list(tmp_path.glob("*.failed"))) == 19
    monkeypatch.setattr(localflight, "SWEEP_EVERY", 0.0)
    fresh = flight.claim(digests[2])
    assert isinstance(fresh, Claim)
    fresh.failed("UpstreamUnavailable", "timed out")  # within FAILED_FOR: kept
    fresh.release()
    _claim_and_release(flight, digests[3])
    assert [p.name for p in tmp_path.glob("*.failed")] == [f"sha256-{digests[2].hex}.failed"]


def test_claims_sweep_what_a_killed_worker_left_long_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed with a temp file no claim holds (a bucket read's spool, its size
    reserved): the restarted worker's start finds it too young to remove. A claim past
    SWEEP_EVERY removes it once it is old, and leaves a live download's file alone."""
    flight = LocalFlight(tmp_path)
    orphan = tmp_path / "blob-orphan01"
    orphan.write_bytes(b"x" * 4096)
    live = flight.claim(parse_digest(f"sha256:{1:064x}"))
    assert isinstance(live, Claim)
    live_temp = tmp_path / "blob-livefile"
    live_temp.write_bytes(b"y")
    live.start(live_temp, 1)
    old = time.time() - localflight.STALE_TEMP - 1
    for path in (orphan, live_temp):
        os.utime(path, (old, old))
    monkeypatch.setattr(localflight, "SWEEP_EVERY", 0.0)

    _claim_and_release(flight, parse_digest(f"sha256:{2:064x}"))

    assert not orphan.exists()
    assert live_temp.exists()  # its download's claim is held
    live.release()


def _claim_and_release(flight: LocalFlight, digest: Digest) -> None:
    claim = flight.claim(digest)
    assert isinstance(claim, Claim)
    claim.release()


async def test_two_apps_on_one_directory_fetch_a_blob_once(
    hub: FakeHub, make_client: MakeClient
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    digest = hub.content.add_blob(data)
    hub.cdn_delay = 0.002
    first, second = await make_client(workers=2), await make_client(workers=2)

    async def get(client: Any) -> bytes:
        resp = await client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 200
        body: bytes = await resp.read()
        return body

    bodies = await asyncio.gather(*(get((first, second)[i % 2]) for i in range(6)))
    assert bodies == [data] * 6
    assert hub.stats["blob_get"] == 1


async def test_a_blob_download_that_failed_fails_the_other_workers_clients_too(
    hub: FakeHub, make_client: MakeClient
) -> None:
    """An upstream that hangs on a blob until read_timeout: the worker that fetched it
    fails its clients, and each worker that followed it then tried the upstream in turn,
    one more timeout each (N workers: N timeouts for the last one's clients)."""
    digest = hub.content.add_blob(os.urandom(1024))
    hub.blob_delay = 3.0
    upstream = UpstreamConfig(url=hub.registry_url, read_timeout=1.0)
    first = await make_client(workers=2, upstream=upstream)
    second = await make_client(workers=2, upstream=upstream)

    async def status(client: Any, after: float) -> int:
        await asyncio.sleep(after)
        resp = await client.get(f"/v2/library/x/blobs/{digest}")
        await resp.read()
        return int(resp.status)

    statuses = await asyncio.gather(status(first, 0.0), status(second, 0.3))
    assert all(s >= 500 for s in statuses), statuses
    fetched = hub.stats["blob_get"]
    assert fetched == 1  # the first worker's GET alone: the second one did not ask
    hub.blob_delay = 0.0  # the marker is good for seconds only: then it is fetched anew
    await asyncio.sleep(FAILED_FOR + 0.5)
    assert await status(second, 0.0) == 200
    assert hub.stats["blob_get"] == fetched + 1


async def test_one_download_followed_by_another_worker_is_one_in_flight_and_one_join(
    hub: FakeHub, make_client: MakeClient
) -> None:
    """`mirror_upstream_fetches_in_flight` is summed over the workers: the worker that
    follows another's download is not fetching, it joined one."""
    data = os.urandom(4 * 1024 * 1024)
    digest = hub.content.add_blob(data)
    hub.cdn_delay = 0.01  # a few seconds for the whole blob
    clients = [await make_client(workers=2), await make_client(workers=2)]
    metrics = [client.app[metrics_key] for client in clients]

    def in_flight() -> float:
        return sum(m.upstream_fetches_in_flight._value.get() for m in metrics)

    async def get(client: Any) -> bytes:
        resp = await client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 200
        body: bytes = await resp.read()
        return body

    first = asyncio.create_task(get(clients[0]))
    await eventually("the first worker's fetch", lambda: hub.stats["blob_get"] == 1)
    second = asyncio.create_task(get(clients[1]))
    await asyncio.sleep(0.5)  # the second worker found the first one's download: it follows
    assert not first.done()
    seen = {in_flight()}
    while not first.done():
        seen.add(in_flight())
        await asyncio.sleep(0.05)
    assert await first == data and await second == data
    assert seen == {1}, seen
    assert hub.stats["blob_get"] == 1
    assert [m.joined_requests._value.get() for m in metrics] == [0, 1]
    await eventually("no download left", lambda: in_flight() == 0)


async def test_a_sibling_download_past_its_size_is_not_followed(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    """Another worker's file holding more than the size it published: the clients that
    would follow it get an error before any byte, not the file's bytes past the size."""
    client = await make_client(workers=2)
    data = os.urandom(150)
    digest = parse_digest(hub.content.add_blob(data[:100]))
    other = LocalFlight(config.storage.path / "tmp").claim(digest)
    assert isinstance(other, Claim)
    temp = config.storage.path / "tmp" / "blob-other"
    temp.write_bytes(data)
    other.start(temp, 100)
    other.progress(150)
    try:
        resp = await client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        other.release()
    assert hub.stats["blob_get"] == 0


@pytest.mark.parametrize("published", [None, 0, 60])
async def test_a_sibling_download_whose_owner_stopped_is_given_up_and_relayed(
    hub: FakeHub, make_client: MakeClient, config: Config, published: int | None
) -> None:
    """Another worker holds the blob's claim but no longer touches it (its loop stuck, the
    process stopped): alive, so its lock holds, and its own rules never fire. Past
    FOLLOW_STALL since its last sign of life its followers get the whole blob from the
    upstream, whether it had published no temp file, no byte or some (before, they and
    every later client of the blob waited for good, while /readyz said 200)."""
    client = await make_client(workers=2)
    data = os.urandom(100)
    digest = parse_digest(hub.content.add_blob(data))
    stuck = LocalFlight(config.storage.path / "tmp").claim(digest)
    assert isinstance(stuck, Claim)
    if published is not None:
        temp = config.storage.path / "tmp" / "blob-stopped"
        temp.write_bytes(data[:published])
        stuck.start(temp, 100)
        stuck.progress(published)
    last_seen = time.time() - downloads.FOLLOW_STALL - 5
    os.utime(stuck.path, (last_seen, last_seen))
    try:
        for _ in range(2):  # each at once: the claim says how long it has stood
            resp = await asyncio.wait_for(client.get(f"/v2/library/x/blobs/{digest}"), 10)
            assert resp.status == 200
            assert await asyncio.wait_for(resp.read(), 10) == data
    finally:
        stuck.release()


async def test_a_sibling_download_at_work_is_followed_however_slow(
    hub: FakeHub, make_client: MakeClient, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker whose bytes come slower than FOLLOW_STALL per write (a slow upstream
    within the pace it allows), or that commits and uploads a verified blob that long, is
    at work: it touches its claim all along, and its followers wait for it, fetching
    nothing (before, a follower took a progress standing still for a stop, and fetched
    the blob again)."""
    monkeypatch.setattr(downloads, "FOLLOW_STALL", 0.5)
    client = await make_client(workers=2)
    data = os.urandom(100)
    digest = parse_digest(hub.content.add_blob(data))
    owner = LocalFlight(config.storage.path / "tmp").claim(digest)
    assert isinstance(owner, Claim)
    temp = config.storage.path / "tmp" / "blob-slow"
    temp.write_bytes(data[:10])
    owner.start(temp, 100)
    owner.progress(10)

    async def slow_owner() -> None:
        for _ in range(15):  # 1.5 s of no progress, three times FOLLOW_STALL
            owner.beat()
            await asyncio.sleep(0.1)
        temp.write_bytes(data)
        owner.progress(100)
        owner.verified()
        for _ in range(10):  # committing, uploading: 1 s more
            owner.beat()
            await asyncio.sleep(0.1)
        final = config.storage.path / "blobs" / "sha256" / digest.hex[:2] / digest.hex
        final.parent.mkdir(parents=True, exist_ok=True)
        temp.rename(final)
        owner.release()

    working = asyncio.create_task(slow_owner())
    try:
        resp = await asyncio.wait_for(client.get(f"/v2/library/x/blobs/{digest}"), 10)
        assert resp.status == 200
        assert await asyncio.wait_for(resp.read(), 10) == data
        await working
    finally:
        owner.release()
    assert hub.stats["blob_get"] == 0
