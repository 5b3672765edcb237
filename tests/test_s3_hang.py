"""A bucket that hangs rather than refuses (its server up, its answers never coming): a
pull the upstream already answered is not held for the S3 client's read timeouts and
retries, a minute and a half, but answered once the bucket's answer deadline passes; a
download's upload is held to its calls' deadlines, and sends nothing more once the bucket
is known to be down; a slow bucket holds no verified blob out of the local tier."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.config.s3 import S3Config
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, FakeHub
from tests.resilience_helpers import metric_value
from tests.rgw import CephRGW
from tests.test_s3 import (
    eventually_exists,
    key,
    local_blob,
    open_uploads,
    s3_requests,
    settled,
    storage,
)
from tests.test_s3_spool import CuttingGateway

MiB = 1024 * 1024
DEADLINE = 1.0  # the bucket's answer deadline here (10 s as shipped)
SEND_RATE = 8 * MiB  # so an 8 MiB part's deadline is 2 s here (18 s as shipped)
PART_DEADLINE = DEADLINE + 8 * MiB / SEND_RATE


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


async def hanging_mirror(
    make_client: MakeClient, tmp_path: Path, s3: S3Config, gateway: HangingGateway
) -> TestClient[Any, Any]:
    """A mirror whose bucket is behind `gateway`, its deadlines short."""
    await gateway.server.start_server()
    endpoint = str(gateway.server.make_url("")).rstrip("/")
    client = await make_client(storage=storage(tmp_path, s3, endpoint=endpoint))
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    store.bucket.answer_deadline = DEADLINE
    store.bucket.send_rate = SEND_RATE
    return client


async def s3_up(client: TestClient[Any, Any]) -> float | None:
    return metric_value(await (await client.get("/metrics")).text(), "mirror_s3_up")


async def test_a_part_the_bucket_hangs_on_holds_the_download_only_to_its_deadline(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """The bucket hangs after a download's first part: the client gets every byte, the
    part that hangs fails at its deadline (the bucket down then), and the blob is in the
    local tier within a few deadlines of its last byte, its download over (its lease, part
    buffer and temp file let go), not minutes later. Once the bucket answers again the
    upload left open is aborted, the local tier serves it, and sends it to the bucket whole."""
    layer = os.urandom(24 * MiB)
    digest = hub.content.add_blob(layer)
    path = f"/v2/library/app/blobs/{digest}"
    gateway = HangingGateway(rgw.endpoint)
    try:
        client = await hanging_mirror(make_client, tmp_path, s3, gateway)
        hub.cdn_delay = 0.01  # per 64 KiB chunk: the body takes 4 s, parts go up meanwhile
        reading = asyncio.ensure_future((await client.get(path)).read())
        while await s3_requests(client, "UploadPart") < 1:
            await asyncio.sleep(0.05)
        gateway.hanging = True
        assert await reading == layer
        body_done = time.monotonic()
        assert (await eventually_exists(local_blob(tmp_path / "data", digest))).exists()
        await settled(client)
        assert time.monotonic() - body_done < 3 * PART_DEADLINE
        assert await s3_up(client) == 0
        assert gateway.held >= 1

        gateway.hanging = False
        gateway.released.set()
        assert await open_uploads(rgw, s3, until=[]) == []  # aborted once the bucket answers
        resp = await client.get(path)
        assert (resp.status, await resp.read()) == (200, layer)
        for _ in range(100):
            if key("blobs", digest) in rgw.s3().keys(s3.bucket):
                break
            await asyncio.sleep(0.1)
        assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer
    finally:
        hub.cdn_delay = 0
        gateway.released.set()
        await gateway.server.close()


async def test_no_part_is_sent_once_the_bucket_is_known_down(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """A manifest pull finds the bucket hanging (down after its deadline) while a blob
    downloads: its upload sends no further part, which would only wait out its deadline
    holding one of the process's two part buffers; the client gets every byte."""
    layer = os.urandom(20 * MiB)
    digest = hub.content.add_blob(layer)
    hub.content.add_image("library/app", "v1", [b"layer"])
    gateway = HangingGateway(rgw.endpoint)
    try:
        client = await hanging_mirror(make_client, tmp_path, s3, gateway)
        hub.cdn_delay = 0.004  # per 64 KiB chunk: the first part is up in a second
        reading = asyncio.ensure_future(
            (await client.get(f"/v2/library/app/blobs/{digest}")).read()
        )
        while await s3_requests(client, "UploadPart") < 1:
            await asyncio.sleep(0.05)
        gateway.hanging = True
        hub.cdn_delay = 0.05  # the next part's bytes come after the bucket is known down
        resp = await client.get("/v2/library/app/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        assert resp.status == 200
        assert await s3_up(client) == 0
        hub.cdn_delay = 0
        assert await reading == layer
        await settled(client)
        assert await s3_requests(client, "UploadPart") == 1
        assert local_blob(tmp_path / "data", digest).exists()
    finally:
        hub.cdn_delay = 0
        gateway.released.set()
        await gateway.server.close()


class SlowPartsGateway(CuttingGateway):
    """A proxy in front of RGW that answers each UploadPart `delay` seconds late: a bucket
    slow to take parts, though within their deadline."""

    def __init__(self, target: str, delay: float) -> None:
        super().__init__(target, cuts=False)
        self.delay = delay

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if "partNumber" in request.query:
            await asyncio.sleep(self.delay)
        return await super().forward(request)


async def test_a_verified_blob_is_in_the_local_tier_before_its_slow_upload_completes(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """Parts that take 2 s each hold no verified blob out of the local tier (where a stop
    would throw it away): it is renamed there once its last byte is in, while its upload
    carries on, and the object lands in the bucket after."""
    layer = os.urandom(24 * MiB)
    digest = hub.content.add_blob(layer)
    gateway = SlowPartsGateway(rgw.endpoint, delay=2.0)
    await gateway.server.start_server()
    try:
        endpoint = str(gateway.server.make_url("")).rstrip("/")
        client = await make_client(storage=storage(tmp_path, s3, endpoint=endpoint))
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert await resp.read() == layer
        assert (await eventually_exists(local_blob(tmp_path / "data", digest))).exists()
        assert key("blobs", digest) not in rgw.s3().keys(s3.bucket)  # its upload goes on
        await settled(client)
        assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer
        assert rgw.s3().multipart_uploads(s3.bucket) == []
    finally:
        await gateway.server.close()
