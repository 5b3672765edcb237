"""Bucket eviction among replicas never cuts another replica's stream from the bucket: two
replicas in one process on one Redis and one bucket (a real Ceph RGW)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from mirror.cluster.bucketshare import BucketShare
from mirror.cluster.lease import Leases
from mirror.cluster.readmarks import READING_PREFIX
from mirror.config import ClusterConfig, RedisConfig
from mirror.config.s3 import S3Config, parse_s3
from mirror.metadata.topology import open_redis
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rgw import CephRGW
from tests.services import RedisServer, free_port
from tests.test_commands import run_cli
from tests.test_s3 import key, serve_config, settled, storage

Client = TestClient[Any, Any]
MiB = 1024 * 1024
LEASE_TTL = 1.0
GRACE = 1.5


async def replica(
    make_client: MakeClient, tmp_path: Path, s3: S3Config, redis_url: str, name: str
) -> Client:
    """A replica with its own local tier, in front of the test's bucket."""
    cluster = ClusterConfig(f"http://127.0.0.1:{free_port()}", b"s" * 32, LEASE_TTL, name)
    return await make_client(
        storage=storage(tmp_path, s3, name, evict_grace=GRACE),
        redis=RedisConfig(url=redis_url),
        cluster=cluster,
    )


async def flushed(server: RedisServer) -> str:
    conn = aioredis.Redis.from_url(server.url)
    await conn.flushdb()
    await conn.aclose()
    return server.url


def tiered(client: Client) -> TieredStorage:
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    return store


async def evict_all(client: Client) -> int:
    """A pass that would empty the bucket (a bound of 1 byte): how many objects went."""
    return (await tiered(client).index.evict(max_size=1)).evicted


async def test_eviction_on_one_replica_leaves_the_object_another_one_streams(
    hub: FakeHub,
    make_client: MakeClient,
    tmp_path: Path,
    s3: S3Config,
    rgw: CephRGW,
    redis_server: RedisServer,
) -> None:
    layer = os.urandom(32 * MiB)
    digest = hub.content.add_blob(layer)
    url = await flushed(redis_server)
    evicting = await replica(make_client, tmp_path, s3, url, "evicting")
    await (await evicting.get(f"/v2/library/app/blobs/{digest}")).read()
    await settled(evicting)
    reading = await replica(make_client, tmp_path, s3, url, "reading")

    # A slow client: the stream from the bucket runs several mark TTLs, while the other
    # replica tries to evict everything again and again.
    resp = await reading.get(f"/v2/library/app/blobs/{digest}")
    hasher, received, passes = hashlib.sha256(), 0, 0
    started = time.monotonic()
    while chunk := await resp.content.read(MiB // 2):
        hasher.update(chunk)
        received += len(chunk)
        if time.monotonic() - started < 4 * LEASE_TTL:
            await asyncio.sleep(0.1)
            assert await evict_all(evicting) == 0
            passes += 1
    assert received == len(layer)
    assert "sha256:" + hasher.hexdigest() == digest
    assert passes > 10
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == [key("blobs", digest)]

    # Within the grace after the stream, still left; then the next pass takes it.
    await asyncio.sleep(0.2)
    assert await evict_all(evicting) == 0
    await asyncio.sleep(GRACE)
    assert await evict_all(evicting) == 1
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == []


async def test_a_replica_that_died_streaming_leaves_a_mark_that_runs_out(
    redis_server: RedisServer,
) -> None:
    url = await flushed(redis_server)
    a = open_redis(url, 4, decode_responses=True)
    b = open_redis(url, 4, decode_responses=True)
    try:
        dead = BucketShare(lambda: Leases(a.client, "http://a:1", LEASE_TTL))
        alive = BucketShare(lambda: Leases(b.client, "http://b:1", LEASE_TTL))
        await dead.begin_read("sha256:" + "1" * 64)
        await alive.begin_read("sha256:" + "2" * 64)
        await dead.close()  # stops renewing, never ends its read: as if killed
        await asyncio.sleep(2 * LEASE_TTL)
        assert not await alive.read_elsewhere("sha256:" + "1" * 64)
        assert await dead.read_elsewhere("sha256:" + "2" * 64)  # renewed while it runs
        await alive.end_read("sha256:" + "2" * 64, 0.0)
        assert not await dead.read_elsewhere("sha256:" + "2" * 64)
        assert await b.client.keys(READING_PREFIX + "*") == []
        await alive.close()
    finally:
        await a.close()
        await b.close()


async def test_one_replica_ending_its_stream_leaves_the_others_mark(
    redis_server: RedisServer,
) -> None:
    url = await flushed(redis_server)
    conn = open_redis(url, 4, decode_responses=True)
    try:
        first = BucketShare(lambda: Leases(conn.client, "http://a:1", LEASE_TTL))
        second = BucketShare(lambda: Leases(conn.client, "http://b:1", LEASE_TTL))
        digest = "sha256:" + "3" * 64
        await first.begin_read(digest)
        await second.begin_read(digest)
        await first.end_read(digest, 0.0)
        assert await first.read_elsewhere(digest)
        await second.end_read(digest, 0.0)
        assert not await first.read_elsewhere(digest)
        for share in (first, second):
            await share.close()
    finally:
        await conn.close()


async def test_a_catch_up_upload_is_live_to_the_other_replicas_under_the_blobs_lease(
    redis_server: RedisServer,
) -> None:
    """A blob sent to the bucket once it answers again (storage/s3/catchup.py) holds the
    blob's lease as a download's upload does: no other replica's chore aborts it, and while
    another replica downloads that blob, its own upload sends it instead."""
    url = await flushed(redis_server)
    conn = open_redis(url, 4, decode_responses=True)
    try:
        first = BucketShare(lambda: Leases(conn.client, "http://a:1", LEASE_TTL))
        second = BucketShare(lambda: Leases(conn.client, "http://b:1", LEASE_TTL))
        digest = "sha256:" + "5" * 64
        async with first.uploading(digest) as mine:
            assert mine
            assert await second.upload_live(digest)
            await asyncio.sleep(2 * LEASE_TTL)  # renewed while the upload runs
            assert await second.upload_live(digest)
            async with second.uploading(digest) as theirs:
                assert not theirs
        assert not await second.upload_live(digest)
        for share in (first, second):
            await share.close()
    finally:
        await conn.close()


@pytest.mark.parametrize("leases_started", [False, True])
async def test_without_redis_no_replica_evicts(leases_started: bool) -> None:
    conn = open_redis(f"redis://127.0.0.1:{free_port()}/0", 4, socket_connect_timeout=0.5)
    try:
        leases = Leases(conn.client, "http://a:1", LEASE_TTL) if leases_started else None
        share = BucketShare(lambda: leases)
        async with share.exclusive() as mine:
            assert not mine
        # A pass that had begun when Redis went away: it cannot tell, so it leaves all.
        assert await share.read_elsewhere("sha256:" + "4" * 64)
        await share.begin_read("sha256:" + "4" * 64)  # a stream goes on without its mark
        await share.end_read("sha256:" + "4" * 64, GRACE)
        await share.close()
    finally:
        await conn.close()


@pytest.mark.parametrize("value", ["soon", "-1s", "2d"])
async def test_a_bad_evict_grace_stops_serve_naming_the_key(tmp_path: Path, value: str) -> None:
    lines = f"bucket: b1b\nevict_grace: {value}"
    status, _, stderr = await run_cli(
        "serve", "--config", str(serve_config(tmp_path, lines)), cwd=tmp_path
    )
    assert status == 2
    assert stderr.strip().startswith("mirror: config: storage.s3.evict_grace: "), stderr
    assert len(stderr.strip().splitlines()) == 1


def test_evict_grace_is_read_and_five_minutes_by_default() -> None:
    assert parse_s3({"bucket": "b1b"}) == S3Config(bucket="b1b", evict_grace=300.0)
    assert parse_s3({"bucket": "b1b", "evict_grace": "30s"}) == S3Config("b1b", evict_grace=30)
