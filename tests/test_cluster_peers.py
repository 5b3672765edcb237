"""Blobs once across replicas, as real processes: the lease holder fetches, the others stream.

    clients (aiohttp) -> 3 mirror processes (cluster:, one Redis, one RGW bucket,
                         a local tier each) -> fake hub (CDN slowed by cdn_delay) -> distribution

The CDN is slowed so that the owner's download is still under way when the other replicas'
clients read their first bytes, and when the owner is killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from mirror.cluster import peerauth
from tests.cluster_helpers import SECRET, cluster_section, metric, s3_section, set_knobs, sha256
from tests.procmem import runs_uvloop
from tests.redis_topologies import flushed_redis_url
from tests.resilience_helpers import RandomImage, seed_random_image, write_config
from tests.rgw import CephRGW
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess, RedisServer

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
LEASE_TTL = 2.0
PEER_STREAMS = "mirror_cluster_peer_streams_total"
BLOB_SIZE = 24 * MiB  # three 8 MiB parts: the owner has a multipart upload open mid-way


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def image(registry: DistributionRegistry) -> RandomImage:
    return seed_random_image(registry.url, "layered", BLOB_SIZE, seed=71)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, image: RandomImage
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


def start_cluster(
    stack: ExitStack,
    tmp_path: Path,
    hub: FakeHubProcess,
    redis_url: str,
    count: int,
    storage: dict[str, Any] | None = None,
) -> list[MirrorProcess]:
    """`count` replicas of one cluster, each with its own local tier (and the same bucket)."""
    replicas = []
    for index in range(count):
        workdir = tmp_path / f"replica{index}"
        replica = MirrorProcess(workdir, hub.registry_url)
        config = {
            "redis": {"url": redis_url},
            "cluster": cluster_section(tmp_path, replica, index, LEASE_TTL),
            **({"storage": storage} if storage else {}),
        }
        replica.extra_args = ("--config", str(write_config(workdir / "mirror.yaml", config)))
        replicas.append(stack.enter_context(replica))
    return replicas


async def upstream_bytes(
    session: aiohttp.ClientSession, replicas: Sequence[MirrorProcess]
) -> float:
    return await metric(session, replicas, "mirror_upstream_bytes_total")


def bucket_key(digest: str) -> str:
    algorithm, hexpart = digest.split(":")
    return f"cache/blobs/{algorithm}/{hexpart}"


async def settled(session: aiohttp.ClientSession, replicas: Sequence[MirrorProcess]) -> None:
    """Until no replica has a download under way (uploads and leases are done then)."""
    for _ in range(1200):
        if await metric(session, replicas, "mirror_upstream_fetches_in_flight") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("downloads still under way")


async def test_concurrent_cold_gets_on_three_replicas_make_one_upstream_fetch(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis_url = flushed_redis_url(request, "single")
    replicas = start_cluster(stack, tmp_path, hub, redis_url, 3, s3_section(rgw, s3_bucket))
    # Replicas take uvloop by default too: peer transfers go by sendfile on it.
    assert all(runs_uvloop(replica.pid) for replica in replicas)
    set_knobs(hub, cdn_delay=0.01)  # ~4 s for the blob: every client joins mid-download
    fetched_at_first_byte: list[float] = []

    async def get(replica: MirrorProcess) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            fetched_at_first_byte.append(await upstream_bytes(session, replicas))
            return first + await resp.read()

    bodies = await asyncio.gather(*(get(replicas[i % 3]) for i in range(8)))

    assert all(body == image.data for body in bodies)
    assert hub.stats()["cdn_get_by_digest"] == {image.layer_digest: 1}
    # Every client, on the owner and on the two followers, had bytes before the one
    # upstream fetch was over: the followers streamed from the owner as it downloaded.
    assert max(fetched_at_first_byte) < BLOB_SIZE
    assert await metric(session, replicas, PEER_STREAMS, {"direction": "in"}) == 2
    assert await metric(session, replicas, PEER_STREAMS, {"direction": "out"}) == 2
    assert (
        await metric(session, replicas, "mirror_cluster_lease_waits_total", {"kind": "blob"}) == 2
    )
    peer_in = await metric(
        session, replicas, "mirror_cluster_peer_bytes_total", {"direction": "in"}
    )
    assert peer_in == 2 * BLOB_SIZE
    await settled(session, replicas)
    s3 = rgw.s3()
    assert sha256(s3.get(s3_bucket, bucket_key(image.layer_digest))) == image.layer_digest
    assert s3.multipart_uploads(s3_bucket) == []


async def test_the_owner_killed_mid_download_is_taken_over_and_survivors_get_right_bytes(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis_url = flushed_redis_url(request, "single")
    replicas = start_cluster(stack, tmp_path, hub, redis_url, 3, s3_section(rgw, s3_bucket))
    set_knobs(hub, cdn_delay=0.02)  # ~8 s for the blob

    async def get(replica: MirrorProcess) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            assert resp.status == 200
            return await resp.read()

    clients = {r.url: [asyncio.create_task(get(r)) for _ in range(2)] for r in replicas}
    while await metric(session, replicas, PEER_STREAMS, {"direction": "in"}) < 2:
        await asyncio.sleep(0.05)
    streamed = [await metric(session, [r], PEER_STREAMS, {"direction": "out"}) for r in replicas]
    owner = replicas[streamed.index(2)]
    survivors = [r for r in replicas if r is not owner]
    # Past the first 8 MiB part: the owner has a multipart upload open in the bucket.
    while await upstream_bytes(session, [owner]) < 12 * MiB:
        await asyncio.sleep(0.05)
    assert owner.proc is not None
    owner.proc.kill()  # SIGKILL: no release, no renewal, no abort
    set_knobs(hub, cdn_delay=0)

    for task in clients[owner.url]:
        with pytest.raises(aiohttp.ClientError):  # a dropped connection, which Docker retries
            await task
    for replica in survivors:
        for body in await asyncio.gather(*clients[replica.url]):
            assert sha256(body) == image.layer_digest and len(body) == BLOB_SIZE

    takeovers = [
        await metric(session, [r], "mirror_cluster_lease_takeovers_total", {"kind": "blob"})
        for r in survivors
    ]
    assert sorted(takeovers) == [0, 1]
    # Once from the start, once from where the owner's bytes stopped (Range).
    assert hub.stats()["cdn_get_by_digest"] == {image.layer_digest: 2}
    await settled(session, survivors)
    s3 = rgw.s3()
    assert sha256(s3.get(s3_bucket, bucket_key(image.layer_digest))) == image.layer_digest
    # The dead owner's upload is left open until a replica starts (or `mirror gc`) ...
    assert len(s3.multipart_uploads(s3_bucket)) == 1
    owner.stop()
    owner.start()  # ... and aborted by the restart
    assert s3.multipart_uploads(s3_bucket) == []


async def test_the_owner_stopped_mid_download_finishes_it_for_its_followers_first(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    """A rolling update: SIGTERM lets requests in flight finish (shutdown_timeout), the
    follower's stream among them, so the owner completes the blob before it goes."""
    redis_url = flushed_redis_url(request, "single")
    replicas = start_cluster(stack, tmp_path, hub, redis_url, 2, s3_section(rgw, s3_bucket))
    set_knobs(hub, cdn_delay=0.02)

    async def get(replica: MirrorProcess) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            return await resp.read()

    clients = [asyncio.create_task(get(r)) for r in replicas]
    while await metric(session, replicas, PEER_STREAMS, {"direction": "in"}) < 1:
        await asyncio.sleep(0.05)
    streamed = [await metric(session, [r], PEER_STREAMS, {"direction": "out"}) for r in replicas]
    owner, survivor = (replicas[0], replicas[1]) if streamed[0] else (replicas[1], replicas[0])
    while await upstream_bytes(session, [owner]) < 12 * MiB:
        await asyncio.sleep(0.05)
    stopping = asyncio.create_task(asyncio.to_thread(owner.stop))  # SIGTERM, waits for exit
    set_knobs(hub, cdn_delay=0)
    await stopping

    assert await clients[replicas.index(survivor)] == image.data
    await asyncio.gather(*clients, return_exceptions=True)
    takeovers = {"kind": "blob"}
    assert await metric(session, [survivor], "mirror_cluster_lease_takeovers_total", takeovers) == 0
    await settled(session, [survivor])
    s3 = rgw.s3()
    assert sha256(s3.get(s3_bucket, bucket_key(image.layer_digest))) == image.layer_digest
    assert s3.multipart_uploads(s3_bucket) == []


async def test_the_owner_resumes_a_cut_upstream_transfer_itself_and_its_followers_go_on(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_cluster(stack, tmp_path, hub, flushed_redis_url(request, "single"), 2)
    set_knobs(hub, cdn_delay=0.005, cdn_cut_after=10 * MiB)  # every transfer cut at 10 MiB

    async def get(replica: MirrorProcess) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            return await resp.read()

    assert await asyncio.gather(*(get(r) for r in replicas)) == [image.data] * 2
    # The owner resumed with Range twice (0-10, 10-20, 20-24 MiB); the other streamed.
    assert hub.stats()["cdn_get_by_digest"] == {image.layer_digest: 3}
    assert await metric(session, replicas, "mirror_resumed_transfers_total") == 2
    assert await metric(session, replicas, PEER_STREAMS, {"direction": "in"}) == 1
    assert await metric(session, replicas, "mirror_cluster_lease_takeovers_total") == 0
    for replica in replicas:  # the owner never waited on its own lease
        assert "never answered" not in replica.log_path.read_text()


async def test_the_internal_endpoint_answers_only_signed_requests(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    (replica,) = start_cluster(stack, tmp_path, hub, flushed_redis_url(request, "single"), 1)
    async with session.get(f"{replica.url}{image.blob_path}") as resp:
        assert await resp.read() == image.data
    path = f"/_cluster/blobs/{image.layer_digest}"
    url = replica.url + path

    for headers in (
        {},
        {peerauth.HEADER: "1700000000:00ff"},
        {peerauth.HEADER: peerauth.sign(b"not-the-cluster-secret-at-all", "GET", path)},
        {peerauth.HEADER: peerauth.sign(SECRET.encode(), "GET", path + "x")},
    ):
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert await metric(session, [replica], "mirror_cluster_peer_refused_total") == 4

    signed = {peerauth.HEADER: peerauth.sign(SECRET.encode(), "GET", path)}
    async with session.get(url, headers={**signed, "Range": "bytes=1000-"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 1000-{BLOB_SIZE - 1}/{BLOB_SIZE}"
        assert await resp.read() == image.data[1000:]
    unknown = "sha256:" + "0" * 64
    path = f"/_cluster/blobs/{unknown}"
    signed = {peerauth.HEADER: peerauth.sign(SECRET.encode(), "GET", path)}
    async with session.get(replica.url + path, headers=signed) as resp:
        assert resp.status == 404  # a replica never fetches for another one
    assert hub.stats()["cdn_get_by_digest"] == {image.layer_digest: 1}


async def test_a_blob_unknown_upstream_is_asked_for_once_across_replicas(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_cluster(stack, tmp_path, hub, flushed_redis_url(request, "single"), 3)
    set_knobs(hub, token_delay=1.0)  # the owner's upstream answer is late: all follow it
    path = f"/v2/{image.repo}/blobs/sha256:{'0' * 64}"

    async def get(replica: MirrorProcess) -> tuple[int, str]:
        async with session.get(replica.url + path) as resp:
            return resp.status, (await resp.json())["errors"][0]["code"]

    answers = await asyncio.gather(*(get(r) for r in replicas))
    assert answers == [(404, "BLOB_UNKNOWN")] * 3
    asked = {"kind": "blob", "status": "404"}
    assert await metric(session, replicas, "mirror_upstream_requests_total", asked) == 1
    # A replica confirms the repository holds the blob before it joins another's download
    # (no digest served under a repository not known to hold it): that one HEAD is shared.
    waits = {"kind": "blobsize"}
    assert await metric(session, replicas, "mirror_cluster_lease_waits_total", waits) == 2


async def test_redis_unreachable_each_replica_downloads_alone(
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis = stack.enter_context(RedisServer(tmp_path / "redis"))
    replicas = start_cluster(stack, tmp_path, hub, redis.url, 3, s3_section(rgw, s3_bucket))
    redis.stop()
    set_knobs(hub, cdn_delay=0.002)

    async def get(replica: MirrorProcess) -> tuple[int, bytes]:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            return resp.status, await resp.read()

    answers = await asyncio.gather(*(get(r) for r in replicas))
    assert answers == [(200, image.data)] * 3
    for replica in replicas:
        assert (
            await metric(
                session, [replica], "mirror_cluster_lease_unavailable_total", {"kind": "blob"}
            )
            == 1
        )
    assert await metric(session, replicas, PEER_STREAMS) == 0
    await settled(session, replicas)
    s3 = rgw.s3()
    assert sha256(s3.get(s3_bucket, bucket_key(image.layer_digest))) == image.layer_digest


# --- bucket eviction on one replica at a time -------------------------------------------


@pytest.fixture(scope="module")
def small_layers(registry: DistributionRegistry) -> list[RandomImage]:
    return [seed_random_image(registry.url, f"small{i}", MiB, seed=80 + i) for i in range(4)]


async def test_bucket_eviction_runs_only_under_the_eviction_lease(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    small_layers: list[RandomImage],
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis_url = flushed_redis_url(request, "single")
    storage = s3_section(rgw, s3_bucket)
    storage["s3"]["max_size"] = int(2.5 * MiB)  # room for two of the 1 MiB layers
    replicas = start_cluster(stack, tmp_path, hub, redis_url, 2, storage)
    held = redis.Redis.from_url(redis_url)
    stack.callback(held.close)
    # Another replica's pass under way: nobody else evicts.
    held.set("mirror:lease:evict:bucket", "http://127.0.0.1:1 elsewhere", px=60_000)
    s3 = rgw.s3()

    async def store(index: int) -> None:
        layer = small_layers[index]
        async with session.get(f"{replicas[index % 2].url}{layer.blob_path}") as resp:
            assert await resp.read() == layer.data
        await settled(session, replicas)

    for index in range(3):
        await store(index)
    await asyncio.sleep(0.5)  # each replica's index woke on its upload and found the lease held
    assert len(s3.keys(s3_bucket, "cache/blobs/")) == 3  # over the bound, untouched
    assert await metric(session, replicas, "mirror_bucket_evictions_total") == 0

    held.delete("mirror:lease:evict:bucket")
    await store(3)  # wakes replica 1's index, which takes the lease and evicts
    for _ in range(200):
        if await metric(session, replicas, "mirror_bucket_evictions_total") >= 2:
            break
        await asyncio.sleep(0.05)
    # 4 MiB down to 90% of the bound: the two least recently read go.
    expected = {bucket_key(layer.layer_digest) for layer in small_layers[2:]}
    assert set(s3.keys(s3_bucket, "cache/blobs/")) == expected
    assert await metric(session, replicas, "mirror_bucket_evictions_total") == 2
    assert held.get("mirror:lease:evict:bucket") is None  # released after the pass


async def test_a_replica_starting_leaves_the_owners_live_upload_alone(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    rgw: CephRGW,
    s3_bucket: str,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis_url = flushed_redis_url(request, "single")
    owner, other = start_cluster(stack, tmp_path, hub, redis_url, 2, s3_section(rgw, s3_bucket))
    set_knobs(hub, cdn_delay=0.03)  # ~12 s: the upload is open while the other restarts
    download = asyncio.create_task(session.get(f"{owner.url}{image.blob_path}"))
    while await upstream_bytes(session, [owner]) < 12 * MiB:  # a multipart upload is open
        await asyncio.sleep(0.05)
    s3 = rgw.s3()
    assert len(s3.multipart_uploads(s3_bucket)) == 1
    other.stop()
    other.start()  # aborts what a crash left open, but not a live replica's upload
    assert len(s3.multipart_uploads(s3_bucket)) == 1
    async with await download as resp:
        assert await resp.read() == image.data
    await settled(session, [owner])
    assert sha256(s3.get(s3_bucket, bucket_key(image.layer_digest))) == image.layer_digest
    assert s3.multipart_uploads(s3_bucket) == []
