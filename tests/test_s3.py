"""The cache in an S3 bucket (storage.s3) against a real Ceph RGW: keys, verification before
an object becomes visible, serving from the bucket with an empty local tier, Range,
redirects to presigned URLs, the bucket's bound, and a gateway that goes away."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror import commands
from mirror.config import Config, ConfigError, RedisConfig, StorageConfig
from mirror.config.s3 import S3Config
from mirror.metadata.fallback import open_metadata
from mirror.metadata.store import MetadataStore
from mirror.observe.metrics import Metrics
from mirror.oci.reference import parse_digest
from mirror.storage.localflight import Claim, LocalFlight
from mirror.storage.s3.bucket import Bucket
from mirror.storage.s3.upload import BucketUpload, PartBuffers, part_size
from mirror.storage.tiered import TieredStorage
from mirror.web.app import create_app
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import OCI_MANIFEST, FakeHub
from tests.resilience_helpers import metric_value
from tests.rgw import CephRGW
from tests.services import RedisServer, free_port
from tests.test_commands import run_cli

Client = TestClient[Any, Any]
MiB = 1024 * 1024


def storage(tmp_path: Path, s3: S3Config, name: str = "data", **changes: Any) -> StorageConfig:
    """A local tier of its own (`name`) in front of the test's bucket."""
    return StorageConfig(path=tmp_path / name, s3=replace(s3, **changes))


def key(kind: str, digest: str, prefix: str = "cache/") -> str:
    algorithm, hexpart = digest.split(":")
    return f"{prefix}{kind}/{algorithm}/{hexpart}"


def local_blob(root: Path, digest: str) -> Path:
    algorithm, hexpart = digest.split(":")
    return root / "blobs" / algorithm / hexpart[:2] / hexpart


async def pull(client: Client, image: dict[str, Any], repo: str = "library/app") -> None:
    """GET the manifest by digest and every blob; each must arrive whole and right."""
    resp = await client.get(f"/v2/{repo}/manifests/{image['digest']}")
    assert resp.status == 200
    assert await resp.read() == image["manifest"]
    for digest in [image["config"], *image["layers"]]:
        resp = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert resp.status == 200, digest
        body = await resp.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


async def s3_requests(client: Client, operation: str | None = None) -> float:
    text = await (await client.get("/metrics")).text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mirror_s3_requests_total{") and (
            operation is None or f'operation="{operation}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def eventually_exists(path: Path) -> Path:
    for _ in range(400):
        if path.exists():
            break
        await asyncio.sleep(0.025)
    return path


async def listed(client: Client) -> None:
    """Wait for the start's listing of the bucket (its ListObjectsV2 requests) to be over."""
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    await store.index.loaded()


async def settled(client: Client) -> None:
    """Wait until the downloads under way have finished (uploads included)."""
    for _ in range(600):
        text = await (await client.get("/metrics")).text()
        if metric_value(text, "mirror_upstream_fetches_in_flight") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("downloads still under way")


async def test_cold_pull_lands_each_object_under_its_key(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """Small blobs go up in one PUT, large ones in parts; manifests keep their media type."""
    image = hub.content.add_image("library/app", "v1", [os.urandom(20 * MiB), b"small layer"])
    client = await make_client(storage=storage(tmp_path, s3))

    await pull(client, image)
    await settled(client)

    bucket = rgw.s3()
    expected = sorted(
        [key("blobs", d) for d in [image["config"], *image["layers"]]]
        + [key("manifests", image["digest"])]
    )
    assert bucket.keys(s3.bucket) == expected
    for digest in [image["config"], *image["layers"]]:
        assert bucket.get(s3.bucket, key("blobs", digest)) == hub.content.blobs[digest]
    head = bucket.client.head_object(Bucket=s3.bucket, Key=key("manifests", image["digest"]))
    assert head["ContentType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert bucket.get(s3.bucket, key("manifests", image["digest"])) == image["manifest"]
    assert bucket.multipart_uploads(s3.bucket) == []
    assert await s3_requests(client, "UploadPart") == 3  # 20 MiB in 8 MiB parts
    assert hub.stats["cdn_get"] == 3  # one upstream fetch per blob


async def test_parts_go_up_with_an_unsigned_payload(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    """The body is not hashed into each part's signature: the blob is verified by digest
    on every read back, and the hash cost a CPU-second per GiB here and in the server."""
    layer = os.urandom(9 * MiB)
    digest = hub.content.add_blob(layer)
    client = await make_client(storage=storage(tmp_path, s3))
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    sent: dict[str, bytes] = {}

    def record(request: Any, **_: Any) -> None:
        sent[request.url.split("?")[1]] = request.headers["X-Amz-Content-SHA256"]

    store.bucket.client.meta.events.register("before-send.s3.UploadPart", record)
    assert await (await client.get(f"/v2/library/app/blobs/{digest}")).read() == layer
    await settled(client)

    assert len(sent) == 2  # 9 MiB in an 8 MiB part and the rest
    assert set(sent.values()) == {b"UNSIGNED-PAYLOAD"}


async def test_concurrent_cold_clients_make_one_fetch_and_one_upload(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layer = os.urandom(20 * MiB)
    digest = hub.content.add_blob(layer)
    hub.cdn_cut_after = 7 * MiB  # and every upstream response breaks: resumed with Range
    client = await make_client(storage=storage(tmp_path, s3))

    async def fetch() -> bytes:
        return await (await client.get(f"/v2/library/app/blobs/{digest}")).read()

    assert await asyncio.gather(*(fetch() for _ in range(4))) == [layer] * 4
    await settled(client)

    assert hub.stats.cdn_get_by_digest[digest] >= 3  # one download, resumed
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "mirror_resumed_transfers_total") >= 2
    assert await s3_requests(client, "CreateMultipartUpload") == 1
    assert await s3_requests(client, "CompleteMultipartUpload") == 1
    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer


async def test_a_digest_mismatch_leaves_nothing_in_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layer = os.urandom(20 * MiB)  # several parts: a multipart upload is begun
    digest = hub.content.add_blob(layer)
    hub.corrupt_blobs = {digest}
    client = await make_client(storage=storage(tmp_path, s3))

    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # cut short: the last bytes wait for a verdict that fails
    await settled(client)

    assert rgw.s3().keys(s3.bucket) == []
    assert rgw.s3().multipart_uploads(s3.bucket) == []
    assert await s3_requests(client, "CreateMultipartUpload") == 1
    assert await s3_requests(client, "AbortMultipartUpload") == 1


async def test_an_empty_local_tier_is_served_from_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    """A new mirror (fresh directory, fresh metadata) pulls with no upstream blob request:
    one GET to the bucket per blob, the local tier filled on the way, then 0 S3 requests."""
    image = hub.content.add_image("library/app", "v1", [os.urandom(12 * MiB), os.urandom(1000)])
    first = await make_client(storage=storage(tmp_path, s3, "first"))
    await pull(first, image)
    await settled(first)
    hub.reset_stats()

    second = await make_client(storage=storage(tmp_path, s3, "second"))
    await pull(second, image)

    assert hub.stats["blob_get"] == hub.stats["cdn_get"] == 0
    assert hub.stats["manifest_get"] == 0  # the manifest came from the bucket too
    blobs = [image["config"], *image["layers"]]
    assert await s3_requests(second, "GetObject") == len(blobs) + 1  # + the manifest
    assert await s3_requests(second, "HeadObject") == 0
    for digest in blobs:  # hashed and kept once the client had it all
        path = await eventually_exists(local_blob(tmp_path / "second", digest))
        assert path.read_bytes() == hub.content.blobs[digest]
    await listed(second)
    before = await s3_requests(second)
    await pull(second, image)
    assert await s3_requests(second) == before  # the local tier: no S3 request at all
    text = await (await second.get("/metrics")).text()
    assert metric_value(text, "mirror_tier_hits_total", {"tier": "bucket"}) == len(blobs)
    assert metric_value(text, "mirror_tier_hits_total", {"tier": "local"}) == len(blobs)


async def test_an_object_changed_in_the_bucket_is_deleted_not_kept(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """An object is only ever written after its digest matched; one changed behind the
    mirror's back is found when its local copy is hashed: deleted, never kept locally."""
    layer = os.urandom(3 * MiB)
    digest = hub.content.add_blob(layer)
    rgw.s3().put(s3.bucket, key("blobs", digest), layer[::-1])
    client = await make_client(storage=storage(tmp_path, s3))
    path = f"/v2/library/app/blobs/{digest}"

    await (await client.get(path)).read()
    for _ in range(400):
        if key("blobs", digest) not in rgw.s3().keys(s3.bucket):
            break
        await asyncio.sleep(0.025)

    assert key("blobs", digest) not in rgw.s3().keys(s3.bucket)
    assert not local_blob(tmp_path / "data", digest).exists()
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "mirror_digest_mismatches_total", {"kind": "blob"}) == 1
    assert await (await client.get(path)).read() == layer  # from upstream, cached anew
    assert hub.stats["cdn_get"] == 1


async def test_a_manifest_stored_as_octet_stream_is_served_under_its_own_type(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """A bucket filled by a sync tool holds manifests as application/octet-stream: one whose
    body names its type is served (and kept locally) under that type; one whose body names
    none is a miss, fetched upstream."""
    image = hub.content.add_image("library/app", "v1", [b"a layer"], media_type=OCI_MANIFEST)
    unnamed = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    bare = hub.content.add_manifest("library/app", unnamed, OCI_MANIFEST)
    for digest, body in ((image["digest"], image["manifest"]), (bare, unnamed)):
        rgw.s3().client.put_object(
            Bucket=s3.bucket, Key=key("manifests", digest), Body=body,
            ContentType="application/octet-stream",
        )  # fmt: skip
    client = await make_client(storage=storage(tmp_path, s3))

    for digest, body in ((image["digest"], image["manifest"]), (bare, unnamed)):
        path = f"/v2/library/app/manifests/{digest}"
        resp = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert (resp.status, await resp.read()) == (200, body)
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        stored = client.app[storage_key].manifest_path(parse_digest(digest)).read_bytes()
        assert stored.startswith(OCI_MANIFEST.encode() + b"\n")
    assert hub.stats["manifest_get"] == 1  # the one whose type the bucket could not tell


async def test_an_oversized_manifest_object_is_not_read(
    make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """An object under a manifest key larger than any manifest is a miss, its body unread."""
    body = json.dumps({"mediaType": OCI_MANIFEST, "padding": "x" * (5 * MiB)}).encode()
    digest = parse_digest("sha256:" + hashlib.sha256(body).hexdigest())
    rgw.s3().client.put_object(
        Bucket=s3.bucket, Key=key("manifests", str(digest)), Body=body, ContentType=OCI_MANIFEST
    )
    client = await make_client(storage=storage(tmp_path, s3))

    assert await client.app[storage_key].read_manifest(digest) is None
    text = await (await client.get("/metrics")).text()
    received = metric_value(text, "mirror_s3_bytes_total", {"direction": "received"}) or 0
    assert received < MiB


async def test_a_range_is_passed_to_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    layer = os.urandom(3 * MiB)
    digest = hub.content.add_blob(layer)
    first = await make_client(storage=storage(tmp_path, s3, "first"))
    assert await (await first.get(f"/v2/library/app/blobs/{digest}")).read() == layer
    await settled(first)
    second = await make_client(storage=storage(tmp_path, s3, "second"))

    resp = await second.get(f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(layer) - 1}/{len(layer)}"
    assert await resp.read() == layer[1000:]
    resp = await second.get(f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=5-9"})
    assert (resp.status, await resp.read()) == (206, layer[5:10])
    past = await second.get(f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=9999999-"})
    assert past.status == 416
    assert past.headers["Content-Range"] == f"bytes */{len(layer)}"
    head = await second.head(f"/v2/library/app/blobs/{digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(layer))
    etag = {"If-None-Match": f'"{digest}"'}
    unchanged = await second.get(f"/v2/library/app/blobs/{digest}", headers=etag)
    assert (unchanged.status, await unchanged.read()) == (304, b"")
    assert await s3_requests(second, "GetObject") == 3
    # A HEAD, and the 304, move no body; the 416 needs the size.
    assert await s3_requests(second, "HeadObject") == 3
    assert not local_blob(tmp_path / "second", digest).exists()  # only whole reads fill it
    assert hub.stats["cdn_get"] == 1


async def from_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, layer: bytes
) -> tuple[Client, str]:
    """A mirror with an empty local tier, in front of a bucket another one put `layer` in;
    the path of the blob."""
    digest = hub.content.add_blob(layer)
    path = f"/v2/library/app/blobs/{digest}"
    first = await make_client(storage=storage(tmp_path, s3, "first"))
    assert await (await first.get(path)).read() == layer
    await settled(first)
    return await make_client(storage=storage(tmp_path, s3, "second")), path


async def test_a_ranged_head_from_the_bucket_is_answered_as_cached(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    client, path = await from_the_bucket(hub, make_client, tmp_path, s3, os.urandom(MiB))

    head = await client.head(path, headers={"Range": "bytes=5-9"})

    assert head.status == 206
    assert head.headers["Content-Range"] == f"bytes 5-9/{MiB}"
    assert head.headers["Content-Length"] == "5"
    assert not local_blob(tmp_path / "second", path.rsplit("/", 1)[1]).exists()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_empty_suffix_range_from_the_bucket_is_416(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, method: str
) -> None:
    """`bytes=-0` (no bytes at all) is the 416 a cached blob gets, whatever the bucket would
    make of it (aiohttp reads it as from byte 0)."""
    client, path = await from_the_bucket(hub, make_client, tmp_path, s3, os.urandom(MiB))

    resp = await client.request(method, path, headers={"Range": "bytes=-0"})

    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{MiB}"


async def test_redirect_answers_307_to_a_presigned_url(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    layer = os.urandom(2 * MiB)
    digest = hub.content.add_blob(layer)
    first = await make_client(storage=storage(tmp_path, s3, "first"))
    assert await (await first.get(f"/v2/library/app/blobs/{digest}")).read() == layer
    await settled(first)
    second = await make_client(storage=storage(tmp_path, s3, "second", redirect=True))
    path = f"/v2/library/app/blobs/{digest}"

    await second.get(path, allow_redirects=False)  # the records may not know it yet
    await listed(second)
    before = await s3_requests(second)
    resp = await second.get(path, allow_redirects=False)

    assert resp.status == 307
    assert await s3_requests(second) == before  # presigning is local
    location = resp.headers["Location"]
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=600" in location
    async with aiohttp.ClientSession() as session:
        async with session.get(location) as got:
            assert (got.status, await got.read()) == (200, layer)
        async with session.get(location, headers={"Range": "bytes=100-199"}) as got:
            assert (got.status, await got.read()) == (206, layer[100:200])
    text = await (await second.get("/metrics")).text()
    assert metric_value(text, "mirror_blob_redirects_total") == 2
    assert hub.stats["cdn_get"] == 1


async def test_the_bucket_bound_evicts_the_least_recently_read(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    a, b, c = (hub.content.add_blob(os.urandom(10 * MiB)) for _ in range(3))
    client = await make_client(storage=storage(tmp_path, s3, max_size=25 * MiB))
    for digest in (a, b):
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()
        await settled(client)
    await (await client.get(f"/v2/library/app/blobs/{a}")).read()  # a: read again, b: not

    await (await client.get(f"/v2/library/app/blobs/{c}")).read()  # 30 MiB > 25 MiB
    await settled(client)

    for _ in range(200):
        if key("blobs", b) not in rgw.s3().keys(s3.bucket):
            break
        await asyncio.sleep(0.05)
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == sorted([key("blobs", a), key("blobs", c)])
    # Evicting from the bucket leaves the local tier alone.
    assert local_blob(tmp_path / "data", b).exists()


def bucket_bytes(client: Any, s3: S3Config) -> int:
    """The size of every blob object in the bucket, records or not."""
    found = client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix="cache/blobs/"
    )
    return sum(item["Size"] for page in found for item in page.get("Contents", []))


def put_unrecorded(rgw: CephRGW, s3: S3Config, size: int) -> str:
    """A blob put in the bucket behind the mirror's back, as if its record were lost."""
    body = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    rgw.s3().put(s3.bucket, key("blobs", digest), body)
    return digest


async def bucket_under(rgw: CephRGW, s3: S3Config, bound: int) -> int:
    """The bucket's blob bytes once at most `bound` (or after 10 s)."""
    client = rgw.s3().client
    for _ in range(100):
        if bucket_bytes(client, s3) <= bound:
            break
        await asyncio.sleep(0.1)
    return bucket_bytes(client, s3)


async def test_a_blob_whose_record_was_lost_is_counted_from_a_listing_at_start(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """A mirror restarted with its records but one (lost: killed before its snapshot,
    Redis restarted) counts that blob from a listing, and keeps the bucket under its bound."""
    a, c = (hub.content.add_blob(os.urandom(10 * MiB)) for _ in range(2))
    bounded = storage(tmp_path, s3, max_size=25 * MiB)
    first = await make_client(storage=bounded)
    await (await first.get(f"/v2/library/app/blobs/{a}")).read()
    await settled(first)
    await first.close()  # its records kept in the snapshot
    lost = put_unrecorded(rgw, s3, 10 * MiB)

    second = await make_client(storage=bounded)
    await (await second.get(f"/v2/library/app/blobs/{c}")).read()  # 30 MiB > 25 MiB
    await settled(second)

    assert await bucket_under(rgw, s3, 25 * MiB) <= 25 * MiB
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == sorted([key("blobs", lost), key("blobs", c)])


async def test_records_follow_the_bucket_while_the_mirror_runs(
    hub: FakeHub, aiohttp_client: Any, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """Checked against a listing now and then (here at every pass): a blob put behind the
    mirror's back is counted and evicted, the record of one deleted behind it dropped."""
    a, b, c = (hub.content.add_blob(os.urandom(10 * MiB)) for _ in range(3))
    app = create_app(replace(config, storage=storage(tmp_path, s3, max_size=25 * MiB)))
    store = app[storage_key]
    assert isinstance(store, TieredStorage)
    store.index.reconcile_interval = 0.0
    client = await aiohttp_client(app)
    for digest in (a, b):
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()
        await settled(client)
    rgw.s3().delete(s3.bucket, key("blobs", b))  # its record stays behind
    lost = put_unrecorded(rgw, s3, 20 * MiB)  # the bucket: 30 MiB, its records: 20 MiB

    await (await client.get(f"/v2/library/app/blobs/{c}")).read()  # the next pass
    await settled(client)

    assert await bucket_under(rgw, s3, 25 * MiB) <= 25 * MiB
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == [key("blobs", c)]  # a, then lost
    assert not await store.index.known(parse_digest(b))
    # The pass deletes an object, then drops its record: the listing may see the one first.
    for _ in range(100):
        if not await store.index.known(parse_digest(lost)):
            break
        await asyncio.sleep(0.05)
    assert not await store.index.known(parse_digest(lost))


async def test_a_blob_being_read_from_the_bucket_is_not_evicted(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layers = [os.urandom(10 * MiB) for _ in range(2)]
    digests = [hub.content.add_blob(layer) for layer in layers]
    first = await make_client(storage=storage(tmp_path, s3, "first"))
    for digest in digests:
        await (await first.get(f"/v2/library/app/blobs/{digest}")).read()
    await settled(first)
    second = await make_client(storage=storage(tmp_path, s3, "second"))

    resp = await second.get(f"/v2/library/app/blobs/{digests[0]}")
    head = await resp.content.readexactly(1000)  # the rest still to come from the bucket
    evicted = await evict_all(second)

    assert head + await resp.read() == layers[0]
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == [key("blobs", digests[0])]
    assert evicted == 1


async def evict_all(client: Client) -> int:
    """Evict the bucket down to nothing (what a bound of 1 byte asks): how many went."""
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    return (await store.index.evict(max_size=1)).evicted


async def readyz(client: Client) -> tuple[int, dict[str, str]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def test_gateway_stopped_mid_upload_leaves_no_object(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layer = os.urandom(40 * MiB)
    digest = hub.content.add_blob(layer)
    hub.cdn_delay = 0.004  # per 64 KiB chunk: the first part is up in a second or two
    client = await make_client(storage=storage(tmp_path, s3, "first"))
    path = f"/v2/library/app/blobs/{digest}"
    try:
        reading = asyncio.ensure_future((await client.get(path)).read())
        while await s3_requests(client, "UploadPart") < 1:
            await asyncio.sleep(0.05)
        hub.cdn_delay = 0.05  # the rest takes 25 s: the gateway is surely gone before it
        await asyncio.to_thread(rgw.stop_gateway)
        hub.cdn_delay = 0
        assert await reading == layer  # the client never notices
        await settled(client)
    finally:
        await asyncio.to_thread(rgw.start_gateway)
    hub.cdn_delay = 0

    assert await (await client.get(path)).read() == layer  # the next pull: the local tier
    # Once the bucket answers again, the upload the gateway cut is aborted and the blob the
    # local tier kept is sent whole (never a part of it under the digest).
    for _ in range(400):
        if rgw.s3().multipart_uploads(s3.bucket) == [] and rgw.s3().keys(s3.bucket):
            break
        await asyncio.sleep(0.05)
    assert rgw.s3().multipart_uploads(s3.bucket) == []
    assert rgw.s3().keys(s3.bucket) == [key("blobs", digest)]
    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer
    # A mirror with a fresh local tier reads it from there: no upstream fetch again.
    hub.reset_stats()
    second = await make_client(storage=storage(tmp_path, s3, "second"))
    assert await (await second.get(path)).read() == layer
    assert hub.stats["cdn_get"] == 0


async def test_a_blob_whose_upload_was_cut_goes_up_when_the_bucket_was_back_before_its_end(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """The bucket stops after a download's first part and answers again while the body is
    still coming: once verified, the blob is sent at once, not at the next hourly chore."""
    layer = os.urandom(40 * MiB)
    digest = hub.content.add_blob(layer)
    hub.cdn_delay = 0.004  # per 64 KiB chunk: the first part is up in a second or two
    client = await make_client(storage=storage(tmp_path, s3, "first"))
    store = client.app[storage_key]
    assert isinstance(store, TieredStorage)
    try:
        reading = asyncio.ensure_future(
            (await client.get(f"/v2/library/app/blobs/{digest}")).read()
        )
        while await s3_requests(client, "UploadPart") < 1:
            await asyncio.sleep(0.05)
        hub.cdn_delay = 0.05  # the rest takes half a minute: the bucket is back before it
        await asyncio.to_thread(rgw.stop_gateway)
        for _ in range(300):
            if not store.bucket.up:
                break
            await asyncio.sleep(0.1)
        assert not store.bucket.up
    finally:
        await asyncio.to_thread(rgw.start_gateway)
    for _ in range(300):
        if store.bucket.up:
            break
        await asyncio.sleep(0.1)
    assert store.bucket.up and not reading.done()
    hub.cdn_delay = 0
    assert await reading == layer
    for _ in range(100):
        if key("blobs", digest) in rgw.s3().keys(s3.bucket):
            break
        await asyncio.sleep(0.1)
    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer


async def test_an_upload_tells_a_bucket_down_from_a_fault_of_its_own(
    tmp_path: Path, s3: S3Config
) -> None:
    """What the catch-up keeps for the bucket's return (the bucket did not answer) and what
    it drops (the object's own fault: here its file is shorter than said)."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 100)
    down = Bucket(replace(s3, endpoint=f"http://127.0.0.1:{free_port()}"), Metrics())
    up = Bucket(s3, Metrics())
    for bucket, size, bucket_down in ((down, 100, True), (up, 200, False)):
        await bucket.open()
        upload = BucketUpload(bucket, key("blobs", "sha256:" + "7" * 64), size, blob,
                              lambda _: None, PartBuffers())  # fmt: skip
        upload.progress(size)
        await upload.complete()
        assert upload.bucket_down is bucket_down
        await bucket.close()


def begin_abandoned_upload(rgw: CephRGW, s3: S3Config) -> str:
    """A multipart upload begun and never ended, as a crashed mirror leaves one: its key."""
    digest = "sha256:" + hashlib.sha256(os.urandom(64)).hexdigest()
    rgw.s3().client.create_multipart_upload(Bucket=s3.bucket, Key=key("blobs", digest))
    return key("blobs", digest)


async def open_uploads(rgw: CephRGW, s3: S3Config, until: list[str]) -> list[str]:
    """The keys of the open multipart uploads, once they are `until` (or after 20 s)."""
    client = rgw.s3()
    for _ in range(200):
        found = sorted(upload["Key"] for upload in client.multipart_uploads(s3.bucket))
        if found == until:
            break
        await asyncio.sleep(0.1)
    return found


async def test_an_abandoned_upload_is_aborted_while_the_mirror_runs(
    hub: FakeHub, aiohttp_client: Any, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """Uploads a crash left open are aborted now and then, not only at the next start; the
    mirror's own upload under way is left alone, however old."""
    layer = os.urandom(20 * MiB)
    digest = hub.content.add_blob(layer)
    app = create_app(replace(config, storage=storage(tmp_path, s3)))
    store = app[storage_key]
    assert isinstance(store, TieredStorage)
    store.abort_interval = 0.2
    client = await aiohttp_client(app)
    hub.cdn_delay = 0.01  # per 64 KiB chunk: the download takes 3 s
    try:
        reading = asyncio.ensure_future(
            (await client.get(f"/v2/library/app/blobs/{digest}")).read()
        )
        while await s3_requests(client, "UploadPart") < 1:
            await asyncio.sleep(0.05)
        abandoned = begin_abandoned_upload(rgw, s3)
        store.abandoned_after = 0.0  # every upload is old enough from now on

        assert await open_uploads(rgw, s3, until=[key("blobs", digest)]) == [key("blobs", digest)]
        assert abandoned not in rgw.s3().keys(s3.bucket)
        assert await reading == layer
    finally:
        hub.cdn_delay = 0
    await settled(client)
    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer  # its upload completed
    assert await open_uploads(rgw, s3, until=[]) == []


async def test_another_workers_upload_under_way_is_not_aborted(
    aiohttp_client: Any, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """With workers, an upload is left while the worker fetching its blob holds the blob's
    claim on the directory, however old, and aborted once that worker is gone."""
    app = create_app(replace(config, workers=2, storage=storage(tmp_path, s3)))
    store = app[storage_key]
    assert isinstance(store, TieredStorage)
    store.abort_interval, store.abandoned_after = 0.1, 0.0
    await aiohttp_client(app)
    digest = "sha256:" + hashlib.sha256(os.urandom(64)).hexdigest()
    sibling = LocalFlight(store.tmp).claim(parse_digest(digest))  # another worker's download
    assert isinstance(sibling, Claim)
    rgw.s3().client.create_multipart_upload(Bucket=s3.bucket, Key=key("blobs", digest))

    await asyncio.sleep(1.0)  # ten chores
    assert await open_uploads(rgw, s3, until=[key("blobs", digest)]) == [key("blobs", digest)]
    sibling.release()  # the worker died, or ended without its upload
    assert await open_uploads(rgw, s3, until=[]) == []


async def test_abandoned_uploads_are_aborted_once_the_bucket_answers_again(
    aiohttp_client: Any, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """A mirror that started while the bucket was down aborts what crashes left open as
    soon as the bucket answers, not an hour later."""
    begin_abandoned_upload(rgw, s3)
    app = create_app(replace(config, storage=storage(tmp_path, s3)))
    store = app[storage_key]
    assert isinstance(store, TieredStorage)
    store.abandoned_after = 0.0
    await asyncio.to_thread(rgw.stop_gateway)
    try:
        await aiohttp_client(app)
        assert not store.bucket.up
    finally:
        await asyncio.to_thread(rgw.start_gateway)

    assert await open_uploads(rgw, s3, until=[]) == []


async def test_only_the_mirrors_own_uploads_are_ever_aborted(
    aiohttp_client: Any, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """With the default prefix "" the bucket may hold other applications' objects too:
    their multipart uploads, however old, are left alone (a key under blobs/ that names
    no digest included); the mirror's own abandoned one is aborted."""
    client = rgw.s3().client
    foreign = sorted(["backups/db-2024.tar", "blobs/sha256/not-a-digest", "manifests/x"])
    for name in foreign:
        client.create_multipart_upload(Bucket=s3.bucket, Key=name)
    digest = "sha256:" + hashlib.sha256(os.urandom(64)).hexdigest()
    client.create_multipart_upload(Bucket=s3.bucket, Key=key("blobs", digest, prefix=""))
    app = create_app(replace(config, storage=storage(tmp_path, s3, prefix="")))
    store = app[storage_key]
    assert isinstance(store, TieredStorage)
    store.abandoned_after = 0.0  # as replicas have it: every upload is old enough

    await aiohttp_client(app)  # a start aborts the abandoned ones

    assert await open_uploads(rgw, s3, until=foreign) == foreign


async def test_a_mirror_starts_while_the_bucket_is_down_and_relays(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layer = os.urandom(2 * MiB)
    digest = hub.content.add_blob(layer)
    image = hub.content.add_image("library/app", "v1", [b"kept while down"])
    path = f"/v2/library/app/blobs/{digest}"
    await asyncio.to_thread(rgw.stop_gateway)
    try:
        client = await make_client(storage=storage(tmp_path, s3))
        down = {"storage": "ok", "metadata": "ok", "bucket": "unreachable"}
        assert await readyz(client) == (503, down)
        text = await (await client.get("/metrics")).text()
        assert metric_value(text, "mirror_s3_up") == 0
        assert "DOWN (serving uncached)" in await (await client.get("/")).text()

        resp = await client.get(path)
        assert (resp.status, await resp.read()) == (200, layer)  # relayed from upstream
        assert not local_blob(tmp_path / "data", digest).exists()  # uncached
        # A manifest is kept locally all the same, and sent once the bucket is back.
        resp = await client.get(f"/v2/library/app/manifests/{image['digest']}")
        assert await resp.read() == image["manifest"]
    finally:
        await asyncio.to_thread(rgw.start_gateway)

    for _ in range(300):  # the bucket is probed again by itself
        if (await readyz(client))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert await readyz(client) == (200, {"storage": "ok", "metadata": "ok", "bucket": "ok"})
    assert await (await client.get(path)).read() == layer
    await settled(client)
    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer
    assert hub.stats["cdn_get"] == 2
    manifest = key("manifests", image["digest"])
    for _ in range(100):
        if manifest in rgw.s3().keys(s3.bucket):
            break
        await asyncio.sleep(0.1)
    assert rgw.s3().get(s3.bucket, manifest) == image["manifest"]


def serve_config(tmp_path: Path, s3_lines: str) -> Path:
    """A config file for `mirror serve` with the given `storage.s3` lines."""
    path = tmp_path / "mirror.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{free_port()}\n"
        f"storage:\n  path: {tmp_path / 'data'}\n  s3:\n"
        + "".join(f"    {line}\n" for line in s3_lines.strip().splitlines())
    )
    return path


@pytest.mark.parametrize(
    ("lines", "key_named"),
    [
        ("bucket: b1b\nendpont: http://127.0.0.1:1", "storage.s3.endpont"),
        ("bucket: b1b\nendpoint: 127.0.0.1:9000", "storage.s3.endpoint"),
        ("bucket: B_b\nendpoint: http://127.0.0.1:1", "storage.s3.bucket"),
        ("endpoint: http://127.0.0.1:1", "storage.s3.bucket"),
        ("bucket: b1b\naccess_key_id: AK", "storage.s3.secret_access_key"),
        ("bucket: b1b\nredirect: sometimes", "storage.s3.redirect"),
        ("bucket: b1b\nredirect_ttl: 30d", "storage.s3.redirect_ttl"),
        ("bucket: b1b\nmax_size: lots", "storage.s3.max_size"),
    ],
)
async def test_bad_s3_settings_stop_serve_naming_the_key(
    tmp_path: Path, lines: str, key_named: str
) -> None:
    status, _, stderr = await run_cli(
        "serve", "--config", str(serve_config(tmp_path, lines)), cwd=tmp_path
    )
    assert status == 2
    assert stderr.strip().startswith(f"mirror: config: {key_named}: "), stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["no such bucket", "wrong secret"])
async def test_a_failing_bucket_check_stops_serve(
    tmp_path: Path, rgw: CephRGW, s3_bucket: str, problem: str
) -> None:
    bucket = "mirror-never-created" if problem == "no such bucket" else s3_bucket
    secret = "not-the-secret" if problem == "wrong secret" else rgw.secret_key
    config = serve_config(
        tmp_path,
        f"bucket: {bucket}\nendpoint: {rgw.endpoint}\naccess_key_id: {rgw.access_key}\n"
        f"secret_access_key: {secret}",
    )
    status, _, stderr = await run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert status == 2
    assert "Traceback" not in stderr and secret not in stderr
    named = "storage.s3.bucket" if problem == "no such bucket" else "storage.s3.access_key_id"
    errors = [line for line in stderr.splitlines() if line.startswith("mirror: ")]
    assert len(errors) == 1 and errors[0].startswith(f"mirror: config: {named}: "), stderr


async def test_commands_work_against_the_bucket(
    hub: FakeHub, config: Config, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """warm fills the bucket; with a fresh local tier, warm finds it all there, ls sizes it,
    verify deletes a corrupt object, and gc evicts to the bucket's bound."""
    image = hub.content.add_image("library/app", "v1", [os.urandom(9 * MiB), b"layer two"])
    blobs = [image["config"], *image["layers"]]
    first = replace(config, storage=storage(tmp_path, s3, "first"))
    report = await commands.warm(first, ["library/app:v1"], None, out=io.StringIO())
    assert (report.fetched, report.failures) == (3, [])
    in_bucket = rgw.s3().keys(s3.bucket, "cache/blobs/")
    assert sorted(in_bucket) == sorted(key("blobs", d) for d in blobs)

    fresh = replace(config, storage=storage(tmp_path, s3, "second"))
    hub.reset_stats()
    report = await commands.warm(fresh, ["library/app:v1"], None, out=io.StringIO())
    assert (report.fetched, report.cached) == (0, 3)
    assert hub.stats["cdn_get"] == 0
    out = io.StringIO()
    assert await commands.list_cache(fresh, out=out) == 1
    assert "9.0 MiB" in out.getvalue()

    bad = image["layers"][1]
    rgw.s3().put(s3.bucket, key("blobs", bad), b"not layer two")
    out = io.StringIO()
    result = await commands.verify(fresh, out=out)
    assert (result.removed, result.unverified) == ([f"{bad} (bucket)"], None)
    assert key("blobs", bad) not in rgw.s3().keys(s3.bucket)

    # Bound to 9 MiB (evicting down to 90% of it): the 9 MiB layer cannot stay.
    out = io.StringIO()
    bounded = replace(config, storage=storage(tmp_path, s3, "second", max_size=9 * MiB))
    await commands.collect_garbage(bounded, 1, out=out)
    assert "bucket: evicted" in out.getvalue()
    assert key("blobs", image["layers"][0]) not in rgw.s3().keys(s3.bucket)


@pytest.mark.parametrize(
    ("args", "bucket_bound"), [(["--to", "1"], ""), ([], "\nmax_size: 1B")], ids=["to", "s3"]
)
async def test_gc_evicts_the_bucket_to_its_bound(
    hub: FakeHub,
    config: Config,
    tmp_path: Path,
    s3: S3Config,
    rgw: CephRGW,
    args: list[str],
    bucket_bound: str,
) -> None:
    """`gc --to` bounds the bucket as it bounds the directory (with no s3.max_size), and
    s3.max_size alone is a bound `gc` runs to (it was refused, wanting --to)."""
    hub.content.add_image("library/app", "v1", [os.urandom(MiB), b"layer two"])
    warmed = replace(config, storage=storage(tmp_path, s3))
    await commands.warm(warmed, ["library/app:v1"], None, out=io.StringIO())
    assert len(rgw.s3().keys(s3.bucket, "cache/blobs/")) == 3
    lines = (
        f"bucket: {s3.bucket}\nendpoint: {rgw.endpoint}\nregion: {rgw.region}\n"
        f"prefix: cache/\naccess_key_id: {rgw.access_key}\nsecret_access_key: {rgw.secret_key}"
    )
    path = serve_config(tmp_path, lines + bucket_bound)

    status, stdout, stderr = await run_cli("gc", "--config", str(path), *args, cwd=tmp_path)

    assert status == 0, stderr
    assert "bucket: evicted 3 blobs" in stdout
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == []
    assert rgw.s3().keys(s3.bucket, "cache/manifests/")  # gc evicts blobs only


def test_s3_secrets_stay_out_of_reprs(s3: S3Config) -> None:
    assert s3.secret_access_key and s3.secret_access_key not in repr(s3)
    assert s3.access_key_id and s3.access_key_id not in repr(s3)


@pytest.fixture
async def metadata(metadata_config: RedisConfig) -> AsyncIterator[MetadataStore]:
    store = open_metadata(metadata_config.url, ttl=60)
    yield store
    await store.close()


async def test_bucket_records_round_trip(metadata: MetadataStore) -> None:
    await metadata.put_blob_read("sha256:aa", 10, 100.5)
    await metadata.put_blob_read("sha256:bb", 20, 200.0)
    await metadata.put_blob_read("sha256:aa", 10, 300.0)
    await metadata.forget_blob("sha256:bb")
    assert await metadata.blob_reads() == {"sha256:aa": (10, 300.0)}
    assert await metadata.get_blob_read("sha256:aa") == (10, 300.0)
    assert await metadata.get_blob_read("sha256:bb") is None


def test_parts_fit_a_10_gib_layer_in_10000() -> None:
    assert part_size(1000) == part_size(None) // 2 == 8 * MiB
    assert part_size(10 * 1024 * MiB) * 10_000 >= 10 * 1024 * MiB
    assert part_size(100 * 1024 * MiB) % MiB == 0
    assert part_size(100 * 1024 * MiB) * 10_000 >= 100 * 1024 * MiB


async def test_a_blob_too_large_for_the_local_tier_is_cached_in_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    layer = os.urandom(12 * MiB)
    digest = hub.content.add_blob(layer)
    small = StorageConfig(path=tmp_path / "data", max_size=5 * MiB, s3=s3)
    client = await make_client(storage=small)
    path = f"/v2/library/app/blobs/{digest}"

    assert await (await client.get(path)).read() == layer
    await settled(client)

    assert rgw.s3().get(s3.bucket, key("blobs", digest)) == layer
    assert not local_blob(tmp_path / "data", digest).exists()
    assert await (await client.get(path)).read() == layer  # from the bucket, not upstream
    assert hub.stats["cdn_get"] == 1
    assert not local_blob(tmp_path / "data", digest).exists()  # nor kept after that read


async def test_records_in_redis_let_a_new_mirror_redirect_with_no_s3_request(
    hub: FakeHub,
    make_client: MakeClient,
    tmp_path: Path,
    s3: S3Config,
    redis_server: RedisServer,
) -> None:
    """What the bucket holds is known from the metadata store: a new mirror with an empty
    local tier sharing the Redis answers its very first GET with a 307, no S3 request."""
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_server.url)
    await conn.flushdb()
    await conn.aclose()
    redis = RedisConfig(url=redis_server.url)
    layer = os.urandom(MiB)
    digest = hub.content.add_blob(layer)
    first = await make_client(storage=storage(tmp_path, s3, "first"), redis=redis)
    assert await (await first.get(f"/v2/library/app/blobs/{digest}")).read() == layer
    await settled(first)

    second = await make_client(storage=storage(tmp_path, s3, "second", redirect=True), redis=redis)
    await listed(second)
    before = await s3_requests(second)
    resp = await second.get(f"/v2/library/app/blobs/{digest}", allow_redirects=False)

    assert resp.status == 307
    assert await s3_requests(second) == before


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_a_bucket_that_fails_for_now_at_start_is_down_not_a_config_error(
    aiohttp_server: Any, status: int
) -> None:
    """A 5xx or throttling at start passes: the mirror starts with the bucket down (and
    probes it), as when it is unreachable. Exit status 2 is for what the operator must fix,
    and is taken as final (systemd's RestartPreventExitStatus, the supervisor)."""
    bucket, asked = await _bucket_answering(aiohttp_server, status)
    try:
        await bucket.open()
        assert not bucket.up and asked
        assert bucket._metrics.registry.get_sample_value("mirror_s3_up") == 0
    finally:
        await bucket.close()


@pytest.mark.parametrize("status", [403, 404])
async def test_a_bucket_refused_or_missing_at_start_is_a_config_error(
    aiohttp_server: Any, status: int
) -> None:
    bucket, _ = await _bucket_answering(aiohttp_server, status)
    with pytest.raises(ConfigError):
        await bucket.open()


async def _bucket_answering(aiohttp_server: Any, status: int) -> tuple[Bucket, list[str]]:
    """A Bucket in front of an S3-speaking server answering `status` to everything."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(f"{request.method} {request.path}")
        return web.Response(status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    config = S3Config(
        bucket="mirror-cache", endpoint=str(server.make_url("")).rstrip("/"),
        access_key_id="key", secret_access_key="secret",
    )  # fmt: skip
    return Bucket(config, Metrics()), asked
