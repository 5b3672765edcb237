"""What replicas ask the upstream besides manifests is asked once across them all: tag lists,
referrers and HEADs of uncached blobs. Three replicas in one process, on one Redis and one
storage directory, in front of a slow fake hub (so that their requests overlap for sure)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from mirror.config import ClusterConfig, RedisConfig
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.resilience_helpers import metric_value
from tests.services import RedisServer, free_port

Client = TestClient[Any, Any]
REPO = "library/app"
SLOW = 0.3  # seconds the fake hub takes per tag list, referrers or blob HEAD request


@pytest.fixture
async def replicas(
    make_client: MakeClient, redis_server: RedisServer, hub: FakeHub
) -> list[Client]:
    conn = aioredis.Redis.from_url(redis_server.url)
    await conn.flushdb()
    await conn.aclose()
    hub.lookup_delay = SLOW
    made = []
    for index in range(3):
        cluster = ClusterConfig(f"http://127.0.0.1:{free_port()}", b"s" * 32, 1.0, f"r{index}")
        made.append(await make_client(redis=RedisConfig(url=redis_server.url), cluster=cluster))
    return made


async def spread(replicas: Sequence[Client], method: str, path: str) -> list[tuple[int, bytes]]:
    """12 concurrent requests, sent to the replicas in turn."""

    async def one(client: Client) -> tuple[int, bytes]:
        resp = await client.request(method, path)
        return resp.status, await resp.read()

    return await asyncio.gather(*(one(replicas[i % len(replicas)]) for i in range(12)))


async def waits(replicas: Sequence[Client], kind: str) -> float:
    total = 0.0
    for client in replicas:
        text = await (await client.get("/metrics")).text()
        total += metric_value(text, "mirror_cluster_lease_waits_total", {"kind": kind}) or 0.0
    return total


async def test_a_tag_list_is_asked_once_across_replicas(
    hub: FakeHub, replicas: list[Client]
) -> None:
    for tag in ("v1", "v2", "v3"):
        hub.content.add_image(REPO, tag, [os.urandom(64)])
    hub.reset_stats()
    answers = await spread(replicas, "GET", f"/v2/{REPO}/tags/list")
    assert {status for status, _ in answers} == {200}
    assert all(b'"v1", "v2", "v3"' in body for _, body in answers)
    assert hub.stats["tags_list"] == 1
    assert await waits(replicas, "taglist") == 2


async def test_referrers_are_asked_once_across_replicas(
    hub: FakeHub, replicas: list[Client]
) -> None:
    image = hub.content.add_image(REPO, "v1", [os.urandom(64)])
    hub.reset_stats()
    answers = await spread(replicas, "GET", f"/v2/{REPO}/referrers/{image['digest']}")
    assert {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1
    assert hub.stats["referrers"] == 1
    assert await waits(replicas, "referrers") == 2


async def test_a_head_of_an_uncached_blob_is_asked_once_across_replicas(
    hub: FakeHub, replicas: list[Client]
) -> None:
    hub.content.add_image(REPO, "v1", [os.urandom(64)])
    blob = os.urandom(3000)
    digest = hub.content.add_blob(blob)
    hub.reset_stats()
    path = f"/v2/{REPO}/blobs/{digest}"
    answers = await asyncio.gather(*(replicas[i % 3].head(path) for i in range(12)))
    assert {resp.status for resp in answers} == {200}
    assert {resp.content_length for resp in answers} == {len(blob)}
    assert hub.stats["blob_head"] == 1
    assert await waits(replicas, "blobsize") == 2
    # Later HEADs, on any replica, within the tag TTL: the kept size, no upstream request.
    assert (await replicas[2].head(path)).content_length == len(blob)
    assert hub.stats["blob_head"] == 1


async def test_a_blob_missing_upstream_is_asked_once_and_missing_for_every_replica(
    hub: FakeHub, replicas: list[Client]
) -> None:
    hub.content.add_image(REPO, "v1", [os.urandom(64)])
    hub.reset_stats()
    path = f"/v2/{REPO}/blobs/sha256:{'5' * 64}"
    answers = await asyncio.gather(*(replicas[i % 3].head(path) for i in range(12)))
    assert {resp.status for resp in answers} == {404}
    assert hub.stats["blob_head"] == 1
