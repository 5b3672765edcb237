"""Rolling updates, as real processes: a stopping replica hands its work over at once.

    clients (aiohttp) -> replicas (cluster:, one Redis, one RGW bucket) -> fake hub -> registry

A replica told to stop (SIGTERM) first answers /readyz 503 for `shutdown_delay` while it
still serves, so a load balancer stops sending it requests; then it stops accepting, lets
requests in flight finish (shutdown_timeout), and deletes the leases of the work it could
not finish, so another replica takes that work over at once instead of after `lease_ttl`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.web.server import SAME_STOP
from tests.cluster_helpers import cluster_section, metric, s3_section, set_knobs, sha256
from tests.redis_topologies import flushed_redis_url
from tests.resilience_helpers import RandomImage, seed_random_image, write_config
from tests.rgw import CephRGW
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess
from tests.test_cluster_peers import PEER_STREAMS, upstream_bytes
from tests.workers_helpers import eventually

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
LONG_LEASE = 30.0  # a takeover well inside it was a release, not an expiry
BLOB_SIZE = 24 * MiB


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def image(registry: DistributionRegistry) -> RandomImage:
    return seed_random_image(registry.url, "rolling", BLOB_SIZE, seed=73)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, image: RandomImage
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


async def draining(session: aiohttp.ClientSession, mirror: MirrorProcess) -> bool:
    """Whether /readyz answers 503: the mirror handled its stop signal."""
    async with session.get(f"{mirror.url}/readyz") as resp:
        return resp.status == 503


def start_replicas(
    stack: ExitStack,
    tmp_path: Path,
    hub: FakeHubProcess,
    redis_url: str,
    count: int,
    extra: dict[str, Any],
) -> list[MirrorProcess]:
    replicas = []
    for index in range(count):
        workdir = tmp_path / f"replica{index}"
        replica = MirrorProcess(workdir, hub.registry_url)
        cluster = cluster_section(tmp_path, replica, index, LONG_LEASE)
        config = {"redis": {"url": redis_url}, "cluster": cluster, **extra}
        replica.extra_args = ("--config", str(write_config(workdir / "mirror.yaml", config)))
        replicas.append(stack.enter_context(replica))
    return replicas


async def test_an_owner_stopped_mid_download_hands_its_lease_over_at_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    """The owner cannot finish within its shutdown_timeout: it gives the lease up as it
    goes, and the follower takes the download over long before the lease would run out."""
    redis_url = flushed_redis_url(request, "single")
    extra = {"shutdown_timeout": "1s", "storage": s3_section(rgw, s3_bucket)}
    replicas = start_replicas(stack, tmp_path, hub, redis_url, 2, extra)
    set_knobs(hub, cdn_delay=0.05)  # ~20 s for the blob: the owner cannot finish it

    async def get(replica: MirrorProcess) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            return await resp.read()

    clients = [asyncio.create_task(get(r)) for r in replicas]
    while await metric(session, replicas, PEER_STREAMS, {"direction": "in"}) < 1:
        await asyncio.sleep(0.05)
    streamed = [await metric(session, [r], PEER_STREAMS, {"direction": "out"}) for r in replicas]
    owner, survivor = (replicas[0], replicas[1]) if streamed[0] else (replicas[1], replicas[0])
    while await upstream_bytes(session, [owner]) < 2 * MiB:
        await asyncio.sleep(0.05)
    stopped_at = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(owner.stop))
    takeovers = {"kind": "blob"}
    while not await metric(session, [survivor], "mirror_cluster_lease_takeovers_total", takeovers):
        waited = time.monotonic() - stopped_at
        assert waited < LONG_LEASE / 3, "no takeover: the lease was left to run out"
        await asyncio.sleep(0.05)
    set_knobs(hub, cdn_delay=0)
    await stopping

    body = await clients[replicas.index(survivor)]
    assert sha256(body) == image.layer_digest and len(body) == BLOB_SIZE
    await asyncio.gather(*clients, return_exceptions=True)


async def test_a_stopping_replica_answers_readyz_503_while_it_still_serves(
    tmp_path: Path, hub: FakeHubProcess, image: RandomImage, session: aiohttp.ClientSession
) -> None:
    mirror = MirrorProcess(tmp_path / "mirror", hub.registry_url)
    # The requests below (a cold pull of the blob among them) fit in it on a loaded machine.
    config = {"shutdown_delay": "10s"}
    mirror.extra_args = ("--config", str(write_config(tmp_path / "mirror.yaml", config)))
    with mirror:
        async with session.get(f"{mirror.url}/readyz") as resp:
            assert resp.status == 200
        assert mirror.proc is not None
        mirror.proc.send_signal(signal.SIGTERM)
        await eventually("/readyz to answer 503", lambda: draining(session, mirror))
        async with session.get(f"{mirror.url}/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"shutdown": "draining"}
        async with session.get(f"{mirror.url}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{mirror.url}{image.blob_path}") as resp:  # new requests too
            assert resp.status == 200
            assert sha256(await resp.read()) == image.layer_digest
        assert mirror.proc.poll() is None
        exited = await asyncio.to_thread(mirror.proc.wait, 30)
        assert exited == 0
        assert "stopping: /readyz answers 503" in mirror.log_path.read_text()


async def test_the_same_stop_delivered_twice_still_drains_and_a_later_one_hurries(
    tmp_path: Path, hub: FakeHubProcess, session: aiohttp.ClientSession
) -> None:
    """A worker gets SIGTERM from its supervisor and from a process-group kill, `timeout`
    sends two: taken as "stop now", the second cut /readyz's 503 window to nothing."""
    mirror = MirrorProcess(tmp_path / "mirror", hub.registry_url)
    config = {"shutdown_delay": "10s"}
    mirror.extra_args = ("--config", str(write_config(tmp_path / "mirror.yaml", config)))
    with mirror:
        async with session.get(f"{mirror.url}/readyz") as resp:
            assert resp.status == 200
        assert mirror.proc is not None
        mirror.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        mirror.proc.send_signal(signal.SIGTERM)  # the same stop, again
        await eventually("/readyz to answer 503", lambda: draining(session, mirror))
        # The mirror's drain began before that answer: a signal from here on is a later one.
        await asyncio.sleep(SAME_STOP + 1.0)
        assert mirror.proc.poll() is None
        assert await draining(session, mirror)
        mirror.proc.send_signal(signal.SIGTERM)  # a later one: stop now
        hurried = time.monotonic()
        exited = await asyncio.to_thread(mirror.proc.wait, 30)
        assert exited == 0
        # Its drain had some 8 s left: it ended for the signal.
        assert time.monotonic() - hurried < 5, "the later signal did not hurry the stop"
