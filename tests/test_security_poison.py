"""No upstream can fill the disk or poison a cache in front of the mirror: oversized blobs,
bodies without end, a full disk under one download, forged digest headers, manifests served
as web pages and unverified ranges each meet a bound, and the cache stays writable.

Each case first makes the attack from a hostile upstream (a small aiohttp app on loopback),
then asserts the refusal, its counter, that nothing reached the cache (no file left under
blobs/, manifests/ or tmp/) or the log, and that the next, normal pull is cached.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.cache import downloads
from mirror.config import (
    Config,
    ConfigError,
    StorageConfig,
    UpstreamConfig,
    config_from_mapping,
)
from mirror.config.storage import DEFAULT_MAX_BLOB_SIZE
from mirror.oci.negotiation import OCI_MANIFEST
from mirror.oci.reference import parse_digest
from mirror.web.keys import downloads_key, metadata_key, metrics_key, storage_key
from tests.conftest import MakeClient

MiB = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    value = client.app[metrics_key].registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def leftovers(data: Path) -> list[Path]:
    """Files under blobs/, manifests/ and tmp/: what an attack must not have left."""
    return [p for kind in ("blobs", "manifests", "tmp") for p in (data / kind).rglob("*")
            if p.is_file()]  # fmt: skip


async def settled(data: Path) -> list[Path]:
    """Leftovers once the download task has had its moment to discard its temp file."""
    for _ in range(100):
        if not leftovers(data):
            break
        await asyncio.sleep(0.02)
    return leftovers(data)


@dataclass
class Hostile:
    """A registry that answers blobs and manifests as each test makes it; counts requests."""

    blobs: dict[str, Handler] = field(default_factory=dict)
    manifests: dict[str, Handler] = field(default_factory=dict)
    asked: Counter[str] = field(default_factory=Counter)
    url: str = ""

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.asked[f"{request.method} blob {digest}"] += 1
        return await self.blobs[digest](request)

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        self.asked[f"{request.method} manifest {reference}"] += 1
        return await self.manifests[reference](request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        return app

    def add_blob(self, data: bytes) -> str:
        """A well-behaved blob (sized, whole), for the normal pull after an attack."""
        digest = digest_of(data)

        async def send(request: web.Request) -> web.StreamResponse:
            return web.Response(body=data, content_type="application/octet-stream")

        self.blobs[digest] = send
        return digest


def chunked(data: bytes, chunk: int = 256 * 1024, sent: list[int] | None = None) -> Handler:
    """A blob sent without Content-Length; `sent` counts the bytes the upstream wrote."""

    async def send(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        if request.method == "HEAD":  # headers alone, as HTTP has it
            return resp
        for offset in range(0, len(data), chunk):
            await resp.write(data[offset : offset + chunk])
            if sent is not None:
                sent.append(chunk)
        await resp.write_eof()
        return resp

    return send


@pytest.fixture
async def hostile(aiohttp_server: Any) -> Hostile:
    registry = Hostile()
    server = await aiohttp_server(registry.app())
    registry.url = f"http://127.0.0.1:{server.port}"
    return registry


@pytest.fixture
def mirror(make_client: MakeClient, hostile: Hostile, config: Config) -> MakeClient:
    """A mirror in front of the hostile upstream; keyword arguments change its storage."""

    async def make(**storage: Any) -> TestClient[Any, Any]:
        upstream = UpstreamConfig(url=hostile.url, connect_timeout=2, read_timeout=5)
        bounds = StorageConfig(path=config.storage.path, **storage)
        return await make_client(upstream=upstream, storage=bounds)

    return make


def name_of(hostile: Hostile) -> str:
    return UpstreamConfig(url=hostile.url).registry


async def assert_still_caches(client: TestClient[Any, Any], hostile: Hostile, data: Path) -> None:
    """The cache is writable, and a normal pull after the attack lands in it."""
    assert client.app[storage_key].writable
    assert sample(client, "mirror_storage_writable") == 1
    layer = os.urandom(200_000)
    digest = hostile.add_blob(layer)
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == layer
    hexpart = digest.partition(":")[2]
    final = data / "blobs" / "sha256" / hexpart[:2] / hexpart
    for _ in range(100):
        if final.exists():
            break
        await asyncio.sleep(0.02)
    assert final.read_bytes() == layer


# --- blobs too large -----------------------------------------------------------------------


async def test_a_blob_whose_length_passes_max_blob_size_is_refused_before_any_byte(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror(max_blob_size=MiB)
    huge = os.urandom(2 * MiB)
    digest = hostile.add_blob(huge)  # sized: its Content-Length says 2 MiB

    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    head = await client.head(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 502
    error = (await resp.json())["errors"][0]
    assert error["code"] == "SIZE_INVALID"
    assert name_of(hostile) in error["message"]
    assert "Retry-After" not in resp.headers  # the same bytes again: no point retrying
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert head.status == 502
    assert sample(client, "mirror_blob_too_large_total", upstream=name_of(hostile)) == 2
    assert await settled(config.storage.path) == []
    await assert_still_caches(client, hostile, config.storage.path)


async def test_a_blob_without_length_is_cut_where_it_passes_max_blob_size(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror(max_blob_size=MiB)
    endless = os.urandom(64 * MiB)  # "endless": far more than the mirror will take
    digest = digest_of(endless)
    sent: list[int] = []
    hostile.blobs[digest] = chunked(endless, sent=sent)

    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        async for chunk in resp.content.iter_any():
            got += chunk

    assert len(got) <= MiB  # cut: never a byte past the bound, never a whole-looking body
    assert sample(client, "mirror_blob_too_large_total", upstream=name_of(hostile)) == 1
    assert sum(sent) < 16 * MiB  # the mirror hung up on the upstream
    assert await settled(config.storage.path) == []
    await assert_still_caches(client, hostile, config.storage.path)


async def test_a_blob_without_length_that_outgrows_the_cache_is_relayed_not_cached(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror(max_size=int(1.5 * MiB))
    layer = os.urandom(3 * MiB)
    digest = digest_of(layer)
    hostile.blobs[digest] = chunked(layer)

    for _ in range(2):
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == layer  # whole and verified, from upstream

    # The first pull learnt the blob does not fit (a download, then the relay); the second
    # is relayed at once, without filling tmp/ again.
    assert hostile.asked[f"GET blob {digest}"] == 3
    assert sample(client, "mirror_blob_too_large_total", upstream=name_of(hostile)) == 0
    assert await settled(config.storage.path) == []
    await assert_still_caches(client, hostile, config.storage.path)


@pytest.mark.parametrize("disk_full", [False, True], ids=["one-blob-too-big", "disk-full"])
async def test_no_space_for_one_download_leaves_the_cache_writable_unless_the_disk_is_full(
    mirror: MakeClient,
    hostile: Hostile,
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    disk_full: bool,
) -> None:
    client = await mirror()  # max_size unbounded: only the disk stops a body without length
    layer = os.urandom(3 * MiB)
    digest = digest_of(layer)
    hostile.blobs[digest] = chunked(layer)
    real_write, writes = downloads._write_all, [0]

    def filling(fd: int, data: bytearray, *rest: Any) -> None:
        writes[0] += 1
        if writes[0] == 1:  # the first write finds the disk full (one write may be all)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data, *rest)

    monkeypatch.setattr(downloads, "_write_all", filling)
    storage = client.app[storage_key]
    if disk_full:  # not even a small file goes in once the temp file is gone
        monkeypatch.setattr(storage, "is_writable", _refuse)

    resp = await client.get(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 200
    assert await resp.read() == layer  # finished from upstream either way
    assert writes[0] == 1
    assert await settled(config.storage.path) == []
    assert storage.writable is not disk_full
    assert sample(client, "mirror_storage_writable") == (0 if disk_full else 1)
    if not disk_full:
        await assert_still_caches(client, hostile, config.storage.path)


async def _refuse() -> bool:
    return False


# --- digests from upstream headers ---------------------------------------------------------

FORGED_DIGESTS = [
    "../../x",
    "sha256:../../../../etc/passwd",
    "sha256:" + "A" * 64,  # upper-case hex is not a digest
    "sha256:" + "0" * 64 + "/../../x",
    "x" * 8_000,  # as long as a header the mirror's client reads may be
]


@pytest.mark.parametrize("forged", FORGED_DIGESTS, ids=["dots", "path", "upper", "slash", "8k"])
async def test_a_forged_digest_header_reaches_no_record_file_header_or_log(
    mirror: MakeClient,
    hostile: Hostile,
    config: Config,
    caplog: pytest.LogCaptureFixture,
    forged: str,
) -> None:
    client = await mirror()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()

    async def manifest(request: web.Request) -> web.Response:
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": forged}
        return web.Response(body=body, headers=headers)

    hostile.manifests["latest"] = manifest
    caplog.set_level(logging.DEBUG)

    head = await client.head("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
    get = await client.get("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})

    true_digest = digest_of(body)
    for resp in (head, get):
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == true_digest
        assert resp.headers["ETag"] == f'"{true_digest}"'
    assert await get.read() == body
    assert hostile.asked["GET manifest latest"] == 1  # the HEAD said nothing usable: one GET
    record = await client.app[metadata_key].get_tag(name_of(hostile), "library/app", "latest")
    assert record is not None and record.digest == true_digest
    stored = [p.name for p in leftovers(config.storage.path)]
    assert stored == [true_digest.partition(":")[2]]
    assert forged[:20] not in caplog.text
    labels = {"upstream": name_of(hostile), "header": "Docker-Content-Digest"}
    assert sample(client, "mirror_upstream_headers_refused_total", **labels) >= 1
    await assert_still_caches(client, hostile, config.storage.path)


async def test_a_header_longer_than_the_client_reads_is_refused_whole(
    mirror: MakeClient, hostile: Hostile, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    client = await mirror()
    garbage = "sha256:" + "\u00e9<script>" * 1000  # 10 KB

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=b"{}", headers={"Docker-Content-Digest": garbage})

    hostile.manifests["latest"] = manifest

    resp = await client.get("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})

    assert resp.status == 503  # aiohttp's parser stops at 8 KiB of header: no answer at all
    assert "<script>" not in await resp.text()
    assert "<script>" not in caplog.text
    assert leftovers(config.storage.path) == []
    assert await client.app[metadata_key].get_tag(name_of(hostile), "library/app", "latest") is None
    await assert_still_caches(client, hostile, config.storage.path)


async def test_a_manifest_fetched_by_digest_must_hash_to_it(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror()
    wanted = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "a": 1}).encode()
    other = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "a": 2}).encode()
    digest = digest_of(wanted)

    async def swapped(request: web.Request) -> web.Response:
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}
        return web.Response(body=other, headers=headers)

    hostile.manifests[digest] = swapped

    resp = await client.get(f"/v2/library/app/manifests/{digest}", headers={"Accept": OCI_MANIFEST})

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert sample(client, "mirror_digest_mismatches_total", kind="manifest") == 1
    assert leftovers(config.storage.path) == []
    await assert_still_caches(client, hostile, config.storage.path)


# --- manifest media types ------------------------------------------------------------------


async def test_a_manifest_served_as_html_is_served_as_the_manifest_it_says_it_is(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()

    async def as_html(request: web.Request) -> web.Response:
        headers = {"Content-Type": "text/html", "Docker-Content-Digest": digest_of(body)}
        return web.Response(body=body, headers=headers)

    hostile.manifests["latest"] = as_html

    head = await client.head("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
    get = await client.get("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})

    for resp in (head, get):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert await get.read() == body
    labels = {"upstream": name_of(hostile), "header": "Content-Type"}
    assert sample(client, "mirror_upstream_headers_refused_total", **labels) >= 1


async def test_a_web_page_for_a_manifest_is_refused_and_not_cached(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror()
    page = b"<html><script>alert(document.cookie)</script></html>"

    async def as_html(request: web.Request) -> web.Response:
        headers = {"Content-Type": "text/html", "Docker-Content-Digest": digest_of(page)}
        return web.Response(body=page, headers=headers)

    hostile.manifests["latest"] = as_html

    resp = await client.get("/v2/library/app/manifests/latest", headers={"Accept": "*/*"})

    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    error = (await resp.json())["errors"][0]
    assert error["code"] == "MANIFEST_INVALID"
    assert name_of(hostile) in error["message"]
    labels = {"upstream": name_of(hostile), "header": "Content-Type"}
    # The tag's HEAD said "text/html", and then its GET.
    assert sample(client, "mirror_upstream_headers_refused_total", **labels) == 2
    assert leftovers(config.storage.path) == []
    assert await client.app[metadata_key].get_tag(name_of(hostile), "library/app", "latest") is None
    await assert_still_caches(client, hostile, config.storage.path)


async def test_a_manifest_without_length_past_the_manifest_bound_is_refused(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror()
    hostile.manifests["latest"] = chunked(b"{" + b" " * (5 * MiB) + b"}")

    resp = await client.get("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert leftovers(config.storage.path) == []
    await assert_still_caches(client, hostile, config.storage.path)


# --- ranges of unverified bytes ------------------------------------------------------------


async def test_a_range_of_a_blob_still_downloading_is_not_immutable(
    mirror: MakeClient, hostile: Hostile, config: Config
) -> None:
    client = await mirror()
    layer = os.urandom(2 * MiB)
    digest = digest_of(layer)
    rest = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(layer)
        await resp.prepare(request)
        await resp.write(layer[: MiB + 1000])
        await rest.wait()  # the rest once the test has made its ranged read
        await resp.write(layer[MiB + 1000 :])
        return resp

    hostile.blobs[digest] = slow
    path = f"/v2/library/app/blobs/{digest}"
    whole = asyncio.create_task(client.get(path))
    for _ in range(200):  # until the first megabyte is on disk
        download = client.app[downloads_key].get(parse_digest(digest))
        if download is not None and download.written >= MiB:
            break
        await asyncio.sleep(0.02)
    assert download is not None and not download.verified

    early = await client.get(path, headers={"Range": "bytes=0-99"})
    assert early.status == 206
    assert await early.read() == layer[:100]
    assert early.headers["Cache-Control"] == "no-store"
    assert early.headers["X-Content-Type-Options"] == "nosniff"

    rest.set()
    assert await (await whole).read() == layer
    late = await client.get(path, headers={"Range": "bytes=0-99"})
    assert late.status == 206
    assert "immutable" in late.headers["Cache-Control"]


# --- the bound's configuration -------------------------------------------------------------


def test_max_blob_size_is_read_and_checked() -> None:
    assert StorageConfig().max_blob_size == DEFAULT_MAX_BLOB_SIZE == 64 * 1024**3
    read = config_from_mapping({"storage": {"max_blob_size": "10GiB"}})
    assert read.storage.max_blob_size == 10 * 1024**3
    assert config_from_mapping({"storage": {"max_blob_size": None}}).storage.max_blob_size is None
    for bad in ("lots", 0, -1, True):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"storage": {"max_blob_size": bad}})
        assert caught.value.key == "storage.max_blob_size"
