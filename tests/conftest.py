"""Fixtures: a fake Docker Hub on real ports, a real redis-server, and mirror apps on both."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, Config, RedisConfig, StorageConfig, UpstreamConfig
from mirror.web.app import create_app
from tests.fakehub import FakeHub
from tests.services import RedisServer

# The real S3 server (Ceph RGW) fixtures: `rgw` for the session, `s3_bucket` per test;
# Redis Sentinel and Cluster: `redis_sentinel`, `redis_cluster` for the session.
pytest_plugins = ["tests.rgw", "tests.redis_topologies"]

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    """A fake Docker Hub: registry, token service and CDN, each on its own port."""
    async with FakeHub() as fake:
        yield fake


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Whatever a test starts (processes, by pid), undone in reverse order even when it fails."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for tests of real processes; a hang fails rather than sticks."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session; tests flush it before use."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, hub: FakeHub) -> Config:
    """A mirror config in front of the fake hub, caching under tmp_path."""
    return Config(
        host="127.0.0.1",
        port=0,
        upstream=UpstreamConfig(url=hub.registry_url, connect_timeout=2, read_timeout=5),
        storage=StorageConfig(path=tmp_path / "data"),
        cache=CacheConfig(tag_ttl=600),
    )


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config) -> MakeClient:
    """Start a mirror app; keyword arguments replace fields of the test config."""

    async def make(**changes: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(replace(config, **changes)))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient[Any, Any]:
    return await make_client()


@pytest.fixture(params=["memory", "redis"])
async def metadata_config(request: pytest.FixtureRequest) -> RedisConfig:
    """Both metadata backends: in-process and a real Redis (flushed)."""
    if request.param == "memory":
        return RedisConfig(url=None)
    server: RedisServer = request.getfixturevalue("redis_server")
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(server.url)
    await conn.flushdb()
    await conn.aclose()
    return RedisConfig(url=server.url)
