"""Blobs: verified, stored once per digest, one upstream fetch for many clients, Range."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest

from mirror.cache.downloads import RESERVE_AHEAD
from mirror.config import Config
from mirror.oci.errors import DigestMismatch
from mirror.oci.reference import parse_digest
from mirror.web.keys import downloads_key, metrics_key, storage_key, upstreams_key
from tests.fakehub import FakeHub
from tests.rawclient import Client as RawClient
from tests.rawclient import Endpoint
from tests.resilience_helpers import metric_value, temp_files_settled

Client = TestClient[Any, Any]


def blob_file(config: Config, digest: str) -> Path:
    algorithm, hexpart = digest.split(":")
    return config.storage.path / "blobs" / algorithm / hexpart[:2] / hexpart


async def wait_cached(config: Config, digest: str) -> Path:
    """The blob's file once it is in the cache: clients get their last byte when the hash
    matched, and the fsync and rename follow."""
    path = blob_file(config, digest)
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.02)
    return path


def temp_files(config: Config) -> list[str]:
    return os.listdir(config.storage.path / "tmp")


async def test_cold_blob_follows_redirect_without_auth_and_is_cached(
    hub: FakeHub, client: Client, config: Config
) -> None:
    layer = os.urandom(3_000_000)
    digest = hub.content.add_blob(layer)

    resp = await client.get(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(layer))
    assert await resp.read() == layer
    assert hub.stats["cdn_get"] == 1
    assert hub.stats["cdn_rejected_auth"] == 0
    assert (await wait_cached(config, digest)).read_bytes() == layer
    assert temp_files(config) == []


async def test_a_blob_past_several_reservation_steps_lands_whole_at_its_size(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """Disk is reserved a step (RESERVE_AHEAD) ahead of the bytes, not all at once: a blob
    of several steps and a part lands byte for byte, its file exactly its size."""
    layer = os.urandom(2 * RESERVE_AHEAD + 12345)
    digest = hub.content.add_blob(layer)
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == layer
    cached = await wait_cached(config, digest)
    assert cached.stat().st_size == len(layer)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
    assert temp_files(config) == []


async def test_warm_blob_makes_no_upstream_request(hub: FakeHub, client: Client) -> None:
    digest = hub.content.add_blob(b"layer bytes" * 1000)
    await (await client.get(f"/v2/library/app/blobs/{digest}")).read()
    hub.reset_stats()

    resp = await client.get(f"/v2/other/repo/blobs/{digest}")

    assert resp.status == 200
    assert await resp.read() == b"layer bytes" * 1000
    assert hub.stats["blob_get"] == hub.stats["cdn_get"] == 0


async def test_eight_concurrent_cold_requests_make_one_upstream_fetch(
    hub: FakeHub, client: Client
) -> None:
    layer = os.urandom(4 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    hub.cdn_delay = 0.005  # slow enough that all eight arrive while it downloads

    async def fetch() -> bytes:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(fetch() for _ in range(8)))

    assert all(body == layer for body in bodies)
    assert hub.stats.cdn_get_by_digest[digest] == 1
    assert hub.stats["blob_get"] == 1
    metrics = await (await client.get("/metrics")).text()
    assert "mirror_joined_requests_total 7.0" in metrics


async def test_late_joiner_streams_from_download_in_progress(hub: FakeHub, client: Client) -> None:
    layer = os.urandom(2 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    hub.cdn_delay = 0.01
    first = await client.get(f"/v2/library/app/blobs/{digest}")
    head = await first.content.readexactly(65536)

    second = await client.get(f"/v2/library/app/blobs/{digest}")

    assert head + await first.read() == layer
    assert await second.read() == layer
    assert hub.stats.cdn_get_by_digest[digest] == 1


async def test_digest_mismatch_is_not_cached_and_client_sees_broken_transfer(
    hub: FakeHub, client: Client, config: Config
) -> None:
    layer = os.urandom(2_000_000)
    digest = hub.content.add_blob(layer)
    hub.corrupt_blobs.add(digest)

    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()

    assert not blob_file(config, digest).exists()
    assert await temp_files_settled(config.storage.path) == []
    hub.corrupt_blobs.clear()
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert await resp.read() == layer  # asked again, it is fetched (and verified) anew


async def test_request_after_a_failed_download_starts_a_new_one(
    hub: FakeHub, client: Client
) -> None:
    """Once its readers have seen a download fail, the next request must not join it (it
    used to stay joinable while its temp file was being removed)."""
    digest = parse_digest(hub.content.add_blob(os.urandom(100_000)))
    hub.corrupt_blobs.add(str(digest))
    downloads = client.app[downloads_key]
    upstream = client.app[upstreams_key].default

    download = downloads.start_or_join(upstream, "library/app", digest)
    with pytest.raises(DigestMismatch):
        await download.finished()

    assert downloads.get(digest) is None
    hub.corrupt_blobs.clear()
    again = downloads.start_or_join(upstream, "library/app", digest)
    assert again is not download
    await again.finished()


async def test_blob_that_landed_meanwhile_is_not_fetched_again(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """A request that found no file may reach the download table just after the download
    that cached the blob has left it: it is served from the file, with no second fetch."""
    layer = os.urandom(300_000)
    digest = hub.content.add_blob(layer)
    assert await (await client.get(f"/v2/library/app/blobs/{digest}")).read() == layer
    await wait_cached(config, digest)
    hub.reset_stats()

    downloads = client.app[downloads_key]
    download = downloads.start_or_join(client.app[upstreams_key].default, "library/app",
                                       parse_digest(digest))  # fmt: skip
    await download.finished()
    file = await download.open_file()
    with file:
        spans = [span async for span in download.spans(0, None)]
        body = b"".join(os.pread(file.fileno(), length, pos) for pos, length in spans)

    assert body == layer
    assert hub.stats["cdn_get"] == 0
    assert hub.stats["blob_get"] == 0


async def test_unknown_blob_upstream_is_oci_404(hub: FakeHub, client: Client) -> None:
    digest = "sha256:" + hashlib.sha256(b"nothing").hexdigest()

    resp = await client.get(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest.mark.parametrize(
    ("header", "status", "expected", "content_range"),
    [
        ("bytes=0-99", 206, slice(0, 100), "bytes 0-99/5000"),
        ("bytes=4900-", 206, slice(4900, 5000), "bytes 4900-4999/5000"),
        ("bytes=-10", 206, slice(4990, 5000), "bytes 4990-4999/5000"),
        ("bytes=100-99999", 206, slice(100, 5000), "bytes 100-4999/5000"),
    ],
)
@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
async def test_range(
    hub: FakeHub,
    client: Client,
    warm: bool,
    header: str,
    status: int,
    expected: slice,
    content_range: str,
) -> None:
    layer = os.urandom(5000)
    digest = hub.content.add_blob(layer)
    if warm:
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()

    resp = await client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": header})

    assert resp.status == status
    assert resp.headers["Content-Range"] == content_range
    assert await resp.read() == layer[expected]


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
async def test_range_past_the_end_is_416(hub: FakeHub, client: Client, warm: bool) -> None:
    digest = hub.content.add_blob(os.urandom(5000))
    if warm:
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()

    resp = await client.get(f"/v2/library/app/blobs/{digest}", headers={"Range": "bytes=5000-"})

    assert resp.status == 416


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
async def test_an_empty_suffix_range_is_416(
    hub: FakeHub, client: Client, warm: bool, method: str
) -> None:
    """`bytes=-0` asks for the last none of the bytes (RFC 9110 §14.1.1); aiohttp reads
    its start as -0, that is 0: the whole blob."""
    digest = hub.content.add_blob(os.urandom(5000))
    if warm:
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()

    path = f"/v2/library/app/blobs/{digest}"
    resp = await client.request(method, path, headers={"Range": "bytes=-0"})

    assert resp.status == 416
    assert resp.headers["Content-Range"] == "bytes */5000"


@pytest.mark.parametrize(
    ("header", "status", "content_range"),
    [
        ("bytes=100-199", 206, "bytes 100-199/5000"),
        ("bytes=-10", 206, "bytes 4990-4999/5000"),
        ("bytes=5000-", 416, "bytes */5000"),
    ],
)
async def test_a_ranged_head_is_answered_alike_cold_and_cached(
    hub: FakeHub, client: Client, config: Config, header: str, status: int, content_range: str
) -> None:
    digest = hub.content.add_blob(os.urandom(5000))
    path = f"/v2/library/app/blobs/{digest}"

    cold = await client.head(path, headers={"Range": header})
    await (await client.get(path)).read()
    await wait_cached(config, digest)
    cached = await client.head(path, headers={"Range": header})

    for resp in (cold, cached):
        assert resp.status == status
        assert resp.headers["Content-Range"] == content_range
    assert cold.headers["Content-Length"] == cached.headers["Content-Length"]
    if status == 206:
        first, last = content_range.split(" ")[1].split("/")[0].split("-")
        assert cold.headers["Content-Length"] == str(int(last) - int(first) + 1)


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
async def test_head_blob(hub: FakeHub, client: Client, warm: bool) -> None:
    layer = os.urandom(12345)
    digest = hub.content.add_blob(layer)
    if warm:
        await (await client.get(f"/v2/library/app/blobs/{digest}")).read()
    hub.reset_stats()

    resp = await client.head(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 200
    assert resp.headers["Content-Length"] == "12345"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert hub.stats["cdn_get"] == 0


async def test_client_disconnect_does_not_cancel_the_download(
    hub: FakeHub, client: Client, config: Config
) -> None:
    layer = os.urandom(2 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    hub.cdn_delay = 0.005
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    await resp.content.readexactly(1000)
    resp.close()  # the client goes away mid-body

    for _ in range(200):
        if blob_file(config, digest).exists():
            break
        await asyncio.sleep(0.05)
    assert blob_file(config, digest).read_bytes() == layer
    assert temp_files(config) == []


async def test_blob_verified_but_not_yet_renamed_counts_as_a_hit(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """Clients get their last byte once the hash matched; the fsync and rename follow. A
    request in between is served from the verified file on disk: a hit, not a miss."""
    layer = os.urandom(1_000_000)
    digest = hub.content.add_blob(layer)
    storage = client.app[storage_key]
    # Hold the real commit (fsync + rename) until the second request is answered: the
    # window is otherwise a few milliseconds wide and a test could not land in it.
    release = threading.Event()
    commit = storage.commit

    def held_commit(fd: int, temp: Path, final: Path) -> None:
        release.wait(30)
        commit(fd, temp, final)

    storage.commit = held_commit  # type: ignore[method-assign]
    try:
        first = await client.get(f"/v2/library/app/blobs/{digest}")
        assert await first.read() == layer
        assert not blob_file(config, digest).exists()  # still held before its rename

        second = await client.get(f"/v2/library/app/blobs/{digest}")
        assert await second.read() == layer
    finally:
        release.set()

    text = await (await client.get("/metrics")).text()
    hits = {"kind": "blob", "result": "hit"}
    misses = {"kind": "blob", "result": "miss"}
    assert metric_value(text, "mirror_cache_requests_total", hits) == 1
    assert metric_value(text, "mirror_cache_requests_total", misses) == 1
    served = "mirror_served_bytes_total"
    assert metric_value(text, served, {"source": "cache"}) == len(layer)
    assert metric_value(text, served, {"source": "upstream"}) == len(layer)
    assert hub.stats["cdn_get"] == 1
    assert (await wait_cached(config, digest)).read_bytes() == layer


async def test_a_streamed_blobs_request_is_timed_to_its_head_not_its_last_byte(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """mirror_http_request_duration_seconds says how long a client waited for an answer:
    a client reading a large blob slowly must not make the mirror look slow."""
    layer = os.urandom(16 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    path = f"/v2/library/app/blobs/{digest}"
    assert await (await client.get(path)).read() == layer
    await wait_cached(config, digest)

    def timed() -> tuple[float, float]:
        text = generate_latest(client.app[metrics_key].registry).decode()
        count = metric_value(text, "mirror_http_request_duration_seconds_count", {"route": "blob"})
        total = metric_value(text, "mirror_http_request_duration_seconds_sum", {"route": "blob"})
        return count or 0.0, total or 0.0

    async def counted(requests: int) -> tuple[float, float]:
        for _ in range(250):  # the middleware observes once the handler returned
            if timed()[0] == requests:
                break
            await asyncio.sleep(0.02)
        return timed()

    before = await counted(1)
    # A connection with a small fixed window (tests/rawclient.py): the body waits on it.
    raw = await RawClient.open(Endpoint(client.server.port), rcvbuf=64 * 1024)
    try:
        started = time.monotonic()
        status, headers = await raw.ask(path)
        assert status == 200
        await asyncio.sleep(1.0)
        assert await raw.body(headers) == layer
        transfer = time.monotonic() - started
    finally:
        await raw.close()
    count, total = await counted(2)
    assert (before[0], count) == (1, 2)
    assert transfer > 1.0
    assert total - before[1] < 0.5, (total - before[1], transfer)
