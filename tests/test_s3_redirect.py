"""Redirects to the bucket (storage.s3.redirect) with several processes on one bucket and one
metadata store: a blob another process evicted is neither redirected to nor claimed back."""

from __future__ import annotations

import asyncio
import io
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mirror import commands
from mirror.config import Config, RedisConfig
from mirror.config.s3 import S3Config
from mirror.storage.s3.index import TOUCH_INTERVAL
from mirror.web.keys import metadata_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rgw import CephRGW
from tests.services import RedisServer
from tests.test_s3 import key, listed, settled, storage

MiB = 1024 * 1024


async def flushed(redis_server: RedisServer) -> RedisConfig:
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_server.url)
    await conn.flushdb()
    await conn.aclose()
    return RedisConfig(url=redis_server.url)


async def test_a_blob_evicted_by_another_process_is_not_redirected_to(
    hub: FakeHub,
    config: Config,
    make_client: MakeClient,
    tmp_path: Path,
    s3: S3Config,
    redis_server: RedisServer,
    rgw: CephRGW,
) -> None:
    """`mirror gc` empties the bucket behind two running mirrors: the one holding the blob
    locally still serves it without recording it as in the bucket again, and the one that
    redirected to it fetches it anew instead of sending clients to a missing object."""
    redis = await flushed(redis_server)
    layer = os.urandom(MiB)
    digest = hub.content.add_blob(layer)
    path = f"/v2/library/app/blobs/{digest}"
    first = await make_client(storage=storage(tmp_path, s3, "first"), redis=redis)
    assert await (await first.get(path)).read() == layer
    await settled(first)
    second = await make_client(storage=storage(tmp_path, s3, "second", redirect=True), redis=redis)
    await listed(second)
    assert (await second.get(path, allow_redirects=False)).status == 307

    gc = replace(config, storage=storage(tmp_path, s3, "gc", max_size=1), redis=redis)
    await commands.collect_garbage(gc, None, out=io.StringIO())
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == []
    metadata = first.app[metadata_key]
    assert await metadata.get_blob_read(digest) is None

    await asyncio.sleep(TOUCH_INTERVAL)  # a read is recorded at most this often per blob
    assert await (await first.get(path)).read() == layer  # its local tier
    assert await metadata.get_blob_read(digest) is None

    resp = await second.get(path, allow_redirects=False)
    assert (resp.status, await resp.read()) == (200, layer)
    assert hub.stats["cdn_get"] == 2
    await settled(second)  # uploaded again: recorded again, for every process
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == [key("blobs", digest)]
    assert await metadata.get_blob_read(digest) == (MiB, pytest.approx(time.time(), abs=30))
