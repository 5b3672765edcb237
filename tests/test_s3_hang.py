"""A bucket that hangs rather than refuses (its server up, its answers never coming): a
pull the upstream already answered is not held for the S3 client's read timeouts and
retries, a minute and a half, but answered once the bucket's answer deadline passes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from aiohttp import web

from mirror.config.s3 import S3Config
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, FakeHub
from tests.resilience_helpers import metric_value
from tests.rgw import CephRGW
from tests.test_s3 import storage
from tests.test_s3_spool import CuttingGateway

DEADLINE = 1.0  # the bucket's answer deadline here (10 s as shipped)
MiB = 1024 * 1024


class HangingGateway(CuttingGateway):
    """A proxy in front of RGW (cutting nothing) that, once `hanging`, never answers what
    it gets until the test ends."""

    def __init__(self, target: str) -> None:
        super().__init__(target, cuts=False)
        self.hanging = False
        self.held = 0
        self.released = asyncio.Event()  # the end of the test: the held ones answer 503

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not self.hanging:
            return await super().forward(request)
        self.held += 1
        await self.released.wait()
        return web.Response(status=503)


async def test_a_hanging_bucket_holds_a_manifest_answer_only_to_its_deadline(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    gateway = HangingGateway(rgw.endpoint)
    await gateway.server.start_server()
    try:
        endpoint = str(gateway.server.make_url("")).rstrip("/")
        client = await make_client(storage=storage(tmp_path, s3, endpoint=endpoint))
        store = client.app[storage_key]
        assert isinstance(store, TieredStorage)
        store.bucket.answer_deadline = DEADLINE
        image = hub.content.add_image("library/app", "v1", [b"layer"])
        gateway.hanging = True
        started = time.monotonic()
        resp = await client.get("/v2/library/app/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        took = time.monotonic() - started
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image["digest"]
        assert gateway.held >= 1  # the bucket was asked, and hung
        assert took < 3 * DEADLINE + 2, took
        text = await (await client.get("/metrics")).text()
        assert metric_value(text, "mirror_s3_up") == 0  # down now: the next pull asks not
        started = time.monotonic()
        resp = await client.get(f"/v2/library/app/manifests/{image['digest']}")
        assert resp.status == 200
        assert time.monotonic() - started < 1.0
    finally:
        gateway.released.set()
        await gateway.server.close()


async def test_a_hanging_bucket_holds_a_blob_miss_only_to_its_deadline(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """A blob miss asks the bucket first by a presigned GET spliced into the local tier:
    its head is held to the answer deadline (not the body's 30 s read timeout), and no
    answer marks the bucket down at once, so the pull goes on to the upstream."""
    layer = os.urandom(MiB)
    digest = hub.content.add_blob(layer)
    gateway = HangingGateway(rgw.endpoint)
    await gateway.server.start_server()
    try:
        endpoint = str(gateway.server.make_url("")).rstrip("/")
        client = await make_client(storage=storage(tmp_path, s3, endpoint=endpoint))
        store = client.app[storage_key]
        assert isinstance(store, TieredStorage)
        assert store._splice  # plain HTTP: the spliced GET is the one asked
        store.bucket.answer_deadline = DEADLINE
        gateway.hanging = True
        started = time.monotonic()
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert (resp.status, await resp.read()) == (200, layer)
        took = time.monotonic() - started
        assert gateway.held >= 1  # the bucket was asked, and hung
        assert took < 3 * DEADLINE + 2, took
        text = await (await client.get("/metrics")).text()
        assert metric_value(text, "mirror_s3_up") == 0
    finally:
        gateway.released.set()
        await gateway.server.close()
