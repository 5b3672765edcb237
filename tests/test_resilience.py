"""Serving through upstream outages, 429s, cut transfers, a lost Redis and cache bounds."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.cache import downloads
from mirror.cache.downloads import CacheWriteFailed, Uncacheable, _shared
from mirror.cache.eviction import CachedBlob, Evictor, choose_victims
from mirror.config import CacheConfig, Config, StorageConfig, UpstreamConfig
from mirror.metadata import memory
from mirror.metadata.fallback import FallbackMetadata, open_metadata
from mirror.metadata.memory import MemoryMetadata
from mirror.metadata.redis import RedisMetadata
from mirror.metadata.store import TagRecord
from mirror.observe.metrics import Metrics
from mirror.oci.errors import BlobTooLarge, TooManyRequests, UpstreamUnavailable
from mirror.storage import Storage
from mirror.upstream import body
from mirror.upstream.breaker import CircuitBreaker
from mirror.web.keys import evictor_key, storage_key
from tests.conftest import MakeClient
from tests.fakehub import Content, FakeHub, digest_of
from tests.resilience_helpers import (
    MIB,
    MountError,
    fill_filesystem,
    temp_files_settled,
    tmpfs,
    wait_for_file,
)
from tests.services import free_port

Client = TestClient[Any, Any]
ACCEPT = {
    "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.index.v1+json"
}
STALE = '110 - "Response is Stale"'


async def fetch_blob(client: Client, digest: str) -> bytes:
    """GET a blob, read it all and wait until it is in the cache (clients get their last
    byte once the hash matched; the fsync and rename follow)."""
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    body = await resp.read()
    algorithm, hexpart = digest.split(":")
    path = client.app[storage_key].blobs / algorithm / hexpart[:2] / hexpart
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.02)
    return body


def blob_file(config: Config, digest: str) -> Path:
    return blob_file_in(config.storage.path, digest)


def blob_file_in(root: Path, digest: str) -> Path:
    algorithm, hexpart = digest.split(":")
    return root / "blobs" / algorithm / hexpart[:2] / hexpart


async def metric(client: Client, line_start: str) -> float | None:
    for line in (await (await client.get("/metrics")).text()).splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
async def image(hub: FakeHub) -> dict[str, Any]:
    return hub.content.add_image("library/app", "latest", [os.urandom(100_000)])


async def cache_image(client: Client, image: dict[str, Any]) -> None:
    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)
    assert resp.status == 200
    for digest in image["layers"]:
        await fetch_blob(client, digest)


# --- behaviour 1 and 3: stale tags, fast failures, 429 ---------------------------------------


STALE_REASON = {500: "unavailable", 503: "unavailable", 429: "rate_limited"}
STALE_REASON |= {401: "unauthorized", 403: "denied"}


@pytest.mark.parametrize("status", [500, 503, 429, 401, 403])
async def test_expired_tag_served_stale_when_upstream_fails(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any], status: int
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=0))
    await cache_image(client, image)
    hub.registry_status = status
    gets_before = hub.stats["manifest_get"]

    for method in ("GET", "HEAD"):
        resp = await client.request(method, "/v2/library/app/manifests/latest", headers=ACCEPT)
        assert resp.status == 200
        assert resp.headers["Warning"] == STALE
        assert resp.headers["Docker-Content-Digest"] == image["digest"]
    blob = await client.get(f"/v2/library/app/blobs/{image['layers'][0]}")

    assert blob.status == 200
    assert hub.stats["manifest_get"] == gets_before  # revalidation never spends a GET
    assert await metric(client, 'mirror_stale_served_total{kind="tag"}') == 2
    reason = STALE_REASON[status]
    assert await metric(client, f'mirror_stale_tag_reasons_total{{reason="{reason}"}}') == 2


async def test_expired_tag_served_stale_when_the_mirrors_credentials_are_refused(
    hub: FakeHub,
    make_client: MakeClient,
    config: Config,
    image: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A revoked token and a rotated password: the token service refuses the account (a
    production mirror's state until someone acts), and every expired tag is served stale
    within stale_if_error, counted and logged once (rate-limited), not refused."""
    hub.users = {"bot": "old"}
    upstream = replace(config.upstream, username="bot", password="old")
    client = await make_client(cache=CacheConfig(tag_ttl=0), upstream=upstream)
    await cache_image(client, image)
    hub.users = {"bot": "rotated"}
    hub.revoke_tokens()

    for method in ("HEAD", "GET", "HEAD"):
        resp = await client.request(method, "/v2/library/app/manifests/latest", headers=ACCEPT)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Warning"] == STALE
        assert resp.headers["Docker-Content-Digest"] == image["digest"]

    assert await metric(client, 'mirror_stale_tag_reasons_total{reason="denied"}') == 3
    assert await metric(client, 'mirror_tag_revalidations_total{result="error"}') == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "mirror.upstream"]
    assert len(logged) == 1
    assert "tag latest served stale (denied)" in logged[0]
    assert "credentials were refused" in logged[0]


async def test_a_tag_gone_upstream_is_not_served_stale(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=0))
    await cache_image(client, image)
    del hub.content.tags["library/app"]["latest"]

    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)

    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_stale_window_is_bounded(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=0, stale_if_error=0))
    await cache_image(client, image)
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_uncached_tag_over_rate_limit_is_429_with_retry_after(
    hub: FakeHub, client: Client
) -> None:
    hub.content.add_image("library/other", "1", [b"x"])
    hub.registry_status = 429

    resp = await client.get("/v2/library/other/manifests/1", headers=ACCEPT)

    assert resp.status == 429
    assert resp.headers["Retry-After"] == "60"
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_after_429_manifest_gets_wait_for_retry_after(hub: FakeHub, client: Client) -> None:
    hub.content.add_image("library/other", "1", [b"x"])
    hub.registry_status = 429
    await client.get("/v2/library/other/manifests/1", headers=ACCEPT)
    hub.registry_status = None
    hub.reset_stats()

    resp = await client.get("/v2/library/other/manifests/1", headers=ACCEPT)

    assert resp.status == 429
    assert hub.stats["manifest_get"] == 0  # asking again would only prolong the penalty


class Limiting:
    """An upstream whose manifest GETs answer `manifest_status` and whose blob GETs answer
    429, each with `retry_after`; `manifest_gets` counts the manifest GETs it was asked. Its
    manifest HEADs answer as Docker Hub's do past the limit: they cost no pull, and work."""

    RETRY_AFTER = "999999999999999999"  # the most digits a header number may have

    def __init__(self, manifest_status: int = 200) -> None:
        self.manifest_status = manifest_status
        self.manifest_gets = 0
        self.content = Content()
        self.content.add_image("library/app", "latest", [b"layer"])

    async def start(self, aiohttp_server: Any) -> str:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._limited)
        return str((await aiohttp_server(app)).make_url("")).rstrip("/")

    async def _manifest(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            self.manifest_gets += 1
            if self.manifest_status == 429:
                return await self._limited(request)
        found = self.content.resolve(request.match_info["name"], request.match_info["ref"])
        assert found is not None
        digest, media_type, body = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return web.Response(body=body, headers=headers)  # a HEAD's: headers and length

    async def _limited(self, request: web.Request) -> web.Response:
        body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}
        return web.json_response(body, status=429, headers={"Retry-After": self.RETRY_AFTER})


async def test_a_blob_429_leaves_manifest_gets_to_the_upstream(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """Pulls are counted on manifest GETs: a blob's 429 (in production, its CDN's) is that
    blob's answer alone, its Retry-After told for an hour at most."""
    upstream = Limiting()
    client = await make_client(upstream=UpstreamConfig(url=await upstream.start(aiohttp_server)))

    resp = await client.get(f"/v2/library/app/blobs/{digest_of(b'layer')}")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3600"

    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    assert upstream.manifest_gets == 1


async def test_a_manifest_429_holds_manifest_gets_back_for_an_hour_at_most(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    upstream = Limiting(manifest_status=429)
    client = await make_client(upstream=UpstreamConfig(url=await upstream.start(aiohttp_server)))

    for asked in (1, 1):  # the second is held back here, not asked
        resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)
        assert resp.status == 429
        assert 3590 <= int(resp.headers["Retry-After"]) <= 3600
        assert upstream.manifest_gets == asked


async def test_unreachable_upstream_fails_fast_with_oci_error(make_client: MakeClient) -> None:
    dead = UpstreamConfig(url=f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    client = await make_client(upstream=dead)

    started = time.monotonic()
    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 3


async def test_circuit_opens_after_repeated_failures(hub: FakeHub, client: Client) -> None:
    hub.registry_status = 503
    for n in range(3):
        assert (await client.get(f"/v2/library/a{n}/manifests/x", headers=ACCEPT)).status == 503
    hub.reset_stats()

    resp = await client.get("/v2/library/b/manifests/x", headers=ACCEPT)

    assert resp.status == 503
    assert "next attempt" in (await resp.json())["errors"][0]["message"]
    assert hub.stats.requests == []  # the upstream was not asked
    upstream = hub.registry_url.removeprefix("http://")
    assert await metric(client, f'mirror_upstream_up{{upstream="{upstream}"}}') == 0


async def test_an_upstream_back_shows_as_up_with_no_client_asking(
    hub: FakeHub, client: Client
) -> None:
    """A quiet mirror probes an open circuit itself: `mirror_upstream_up` (and the alert on
    it) must not wait for the next pull after the upstream came back."""
    hub.registry_status = 503
    for n in range(3):
        assert (await client.get(f"/v2/library/a{n}/manifests/x", headers=ACCEPT)).status == 503
    gauge = f'mirror_upstream_up{{upstream="{hub.registry_url.removeprefix("http://")}"}}'
    assert await metric(client, gauge) == 0
    hub.registry_status = None
    hub.reset_stats()

    deadline = time.monotonic() + 10  # the backoff (1 s) and a look (1 s), with room
    while await metric(client, gauge) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    assert await metric(client, gauge) == 1
    # The probe, and nothing else: no client asked. It asks what failed last (with the
    # token a client's request would fetch for it).
    asked = {(method, path.split("?")[0]) for _, method, path in hub.stats.requests}
    assert asked == {("HEAD", "/v2/library/a2/manifests/x"), ("GET", "/token")}
    image = hub.content.add_image("library/back", "1", [b"layer"])
    resp = await client.get("/v2/library/back/manifests/1", headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == image["digest"]


async def test_an_upstream_whose_manifests_fail_stays_down_though_its_v2_answers(
    hub: FakeHub, client: Client
) -> None:
    """A partial outage (the registry's `/v2/` answers, its manifests 503): the probe asks
    what failed, so the circuit stays open and `mirror_upstream_up` at 0 (a probe of `/v2/`
    closed it again and again: the gauge flapped and the alert never fired)."""
    hub.manifests_status = 503
    for n in range(3):
        assert (await client.get(f"/v2/library/a{n}/manifests/x", headers=ACCEPT)).status == 503
    gauge = f'mirror_upstream_up{{upstream="{hub.registry_url.removeprefix("http://")}"}}'
    hub.reset_stats()
    seen = []
    for _ in range(30):  # 3 s: backoffs of 1 s and 2 s, a probe after each
        seen.append(await metric(client, gauge))
        await asyncio.sleep(0.1)

    assert set(seen) == {0}
    probes = [path for _, method, path in hub.stats.requests if method == "HEAD"]
    assert probes and set(probes) == {"/v2/library/a2/manifests/x"}


def test_breaker_probes_with_backoff_and_closes_on_success() -> None:
    now = [0.0]
    breaker = CircuitBreaker("up", threshold=2, base_delay=1, max_delay=4, clock=lambda: now[0])
    breaker.failure()
    breaker.before_request()  # one failure: still closed
    breaker.failure()
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()
    now[0] = 1.0
    breaker.before_request()  # the probe goes through
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()  # ... alone
    breaker.failure()  # the probe failed: open for twice as long
    now[0] = 2.5
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()
    now[0] = 3.0
    breaker.before_request()
    breaker.success()
    assert not breaker.is_open
    breaker.before_request()


# --- behaviour 4: negative cache ---------------------------------------------------------------


async def test_upstream_404_is_remembered(hub: FakeHub, client: Client) -> None:
    for _ in range(3):
        resp = await client.get("/v2/library/nothing/manifests/latest", headers=ACCEPT)
        assert resp.status == 404
    digest = "sha256:" + "0" * 64
    for _ in range(3):
        assert (await client.get(f"/v2/library/nothing/blobs/{digest}")).status == 404

    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 0)
    assert hub.stats["blob_get"] == 1
    assert await metric(client, "mirror_negative_cache_hits_total") == 4


async def test_negative_entries_expire(hub: FakeHub, make_client: MakeClient) -> None:
    client = await make_client(cache=CacheConfig(negative_ttl=0.2))
    assert (await client.get("/v2/library/late/manifests/1", headers=ACCEPT)).status == 404
    late = hub.content.add_image("library/late", "1", [b"y"])
    await asyncio.sleep(0.3)

    resp = await client.get("/v2/library/late/manifests/1", headers=ACCEPT)

    assert resp.headers["Docker-Content-Digest"] == late["digest"]


# --- behaviour 5: cut transfers ----------------------------------------------------------------


async def test_cut_transfer_is_resumed_with_range(
    hub: FakeHub, client: Client, config: Config
) -> None:
    layer = os.urandom(3 * 1024 * 1024 + 123)
    digest = hub.content.add_blob(layer)
    hub.cdn_cut_after = 1024 * 1024  # every CDN response breaks after 1 MiB

    resp = await client.get(f"/v2/library/app/blobs/{digest}")

    assert await resp.read() == layer
    # Each CDN response carries at most 1 MiB: at least 4 requests, the later ones resumes
    # (aiohttp may drop what it had buffered when a connection breaks, so maybe more).
    assert hub.stats.cdn_get_by_digest[digest] >= 4
    assert await wait_for_file(blob_file(config, digest))
    assert blob_file(config, digest).read_bytes() == layer
    resumed = await metric(client, "mirror_resumed_transfers_total")
    assert resumed is not None and resumed >= 2


async def test_cut_transfer_without_range_support_aborts_every_client(
    hub: FakeHub, client: Client, config: Config
) -> None:
    layer = os.urandom(2 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    hub.cdn_cut_after = 1024 * 1024
    hub.cdn_ignores_range = True
    hub.cdn_delay = 0.002

    async def fetch() -> None:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    await asyncio.gather(fetch(), fetch(), fetch())

    assert not blob_file(config, digest).exists()
    assert await temp_files_settled(config.storage.path) == []


async def test_cut_transfer_resumed_a_few_bytes_at_a_time_is_given_up(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that sends a few bytes, waits inside the read timeout and cuts, each
    connection anew: every body is too short-lived for a pace window of its own, and each
    resume brings a byte, so the download (and every client on it) was held for days. The
    pace is the whole download's: it ends in an error within a window or so."""
    monkeypatch.setattr(body, "PACE_WINDOW", 1.0)  # 60 s as shipped
    layer = os.urandom(1024 * 1024)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    asked: list[str] = []

    async def blob(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Range", ""))
        first = int(request.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        resp = web.StreamResponse(status=206 if first else 200)
        resp.content_length = len(layer) - first
        if first:
            resp.headers["Content-Range"] = f"bytes {first}-{len(layer) - 1}/{len(layer)}"
        await resp.prepare(request)
        await resp.write(layer[first : first + 64])
        await asyncio.sleep(0.3)  # within the read timeout
        assert request.transport is not None
        request.transport.close()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(upstream)
    url = f"http://127.0.0.1:{server.port}"
    client = await make_client(upstream=UpstreamConfig(url=url, read_timeout=2))
    started = time.monotonic()

    async def fetch() -> bytes:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        return bytes(await resp.read())

    with pytest.raises(aiohttp.ClientPayloadError):  # cut short, never complete-looking
        await asyncio.wait_for(fetch(), 10)
    assert time.monotonic() - started < 5
    assert len(asked) >= 2 and asked[1].startswith("bytes=")  # it was resumed meanwhile


async def test_cut_transfer_on_a_fast_link_is_resumed_through_many_pace_windows(
    hub: FakeHub, client: Client, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(body, "PACE_WINDOW", 0.5)  # 60 s as shipped
    layer = os.urandom(4 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    hub.cdn_cut_after = 512 * 1024
    hub.cdn_delay = 0.02  # 64 KiB each: some 3 MB/s, a second or so for the blob

    resp = await client.get(f"/v2/library/app/blobs/{digest}")

    assert await resp.read() == layer
    assert hub.stats.cdn_get_by_digest[digest] >= 8
    assert await wait_for_file(blob_file(config, digest))


# --- behaviour 7: Redis unreachable ------------------------------------------------------------


async def test_unreachable_redis_falls_back_to_memory() -> None:
    changes: list[bool] = []
    dead = RedisMetadata(f"redis://127.0.0.1:{free_port()}/0", ttl=60)
    store = FallbackMetadata(dead, MemoryMetadata(60), on_change=changes.append)
    record = TagRecord("sha256:" + "a" * 64, "application/json", 10, time.time())

    await store.put_tag("hub", "library/app", "latest", record)
    assert await store.get_tag("hub", "library/app", "latest") == record
    await store.add_repository("library/app")
    assert await store.repositories(10, None) == ["library/app"]
    assert changes == [False]
    assert not store.up
    await store.close()


async def test_the_stand_in_keeps_only_recent_records() -> None:
    """Every tag record and holding written went into the in-process stand-in too, whose
    expired entries went only when asked for during an outage: a replica pushed a tag per
    commit grew for its whole life, healthy Redis or not."""
    store = open_metadata(f"redis://127.0.0.1:{free_port()}/0", ttl=60)
    assert isinstance(store, FallbackMetadata)
    standin = store._fallback  # the in-process copy this is about
    assert isinstance(standin, MemoryMetadata)

    def record(n: int, at: float) -> TagRecord:
        return TagRecord(f"sha256:{n:064x}", "application/json", 10, at)

    old = time.time() - 30 * 86400  # past the TTL and the retention
    for n in range(3 * memory.SWEEP_MIN):
        await store.put_tag("hub", f"org/app{n % 50}", f"sha-{n}", record(n, old))
        await store.add_holdings("hub", f"org/app{n}", [f"sha256:{n:064x}"], old)
    assert len(await store.tags()) <= memory.SWEEP_MIN  # answered by the stand-in
    assert len(standin._holdings) <= memory.SWEEP_MIN

    written = 2 * memory.STANDIN_ENTRIES
    for n in range(written):
        await store.put_tag("hub", f"org/app{n % 50}", f"sha-{n}", record(n, time.time()))
        await store.add_holdings("hub", f"org/app{n}", [f"sha256:{n:064x}"], time.time())
    bound = memory.STANDIN_ENTRIES * 5 // 4
    assert len(await store.tags()) <= bound and len(standin._holdings) <= bound
    assert not store.up  # answered in the outage, the latest written:
    last = written - 1
    found = await store.get_tag("hub", f"org/app{last % 50}", f"sha-{last}")
    assert found is not None and found.digest == f"sha256:{last:064x}"
    assert await store.holds("hub", f"org/app{last}", f"sha256:{last:064x}")
    await store.close()

    single = MemoryMetadata(60)  # a single node's own store: its recent records all kept
    for n in range(written):
        await single.put_tag("hub", "org/app", f"sha-{n}", record(n, time.time()))
    assert len(await single.tags()) == written


async def test_requests_work_with_redis_unreachable(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    from mirror.config import RedisConfig

    client = await make_client(redis=RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0"))

    await cache_image(client, image)
    resp = await client.get("/v2/library/app/manifests/latest", headers=ACCEPT)

    assert resp.status == 200
    assert await metric(client, "mirror_metadata_up") == 0
    assert (await client.get("/readyz")).status == 503


# --- behaviour 8 and 9: uncacheable blobs and eviction -----------------------------------------


async def test_blob_larger_than_the_cache_is_streamed_uncached(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    storage = StorageConfig(path=config.storage.path, max_size=1_000_000)
    client = await make_client(storage=storage)
    layer = os.urandom(1_500_000)
    digest = hub.content.add_blob(layer)

    for _ in range(2):
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == layer

    assert not blob_file(config, digest).exists()
    # Relayed bytes are received from the upstream all the same (the dashboards' traffic).
    upstream = hub.registry_url.removeprefix("http://")
    received = await metric(client, f'mirror_upstream_bytes_total{{upstream="{upstream}"}}')
    assert received == 2 * len(layer)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the cache (root only); unmounted after the app on it stopped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with tmpfs(tmp_path / "volume", "24m") as path:
            yield path
    except MountError as exc:
        pytest.skip(f"cannot mount here: {exc}")


async def test_concurrent_cold_blobs_take_only_the_room_the_volume_has(
    hub: FakeHub, small_volume: Path, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four 9 MiB blobs pulled at once into a 24 MiB volume: each download needs its whole
    size free beyond what the running ones were promised (they reserve as they go), so two
    are kept and the others relayed at once. Before, all four passed the check, filled the
    volume together, and one at most was kept, each retry alike."""
    monkeypatch.setattr(downloads, "RESERVE_AHEAD", MIB)
    hub.cdn_delay = 0.002  # the four downloads overlap
    client = await make_client(storage=StorageConfig(path=small_volume))
    layers = [os.urandom(9 * MIB) for _ in range(4)]
    digests = [hub.content.add_blob(layer) for layer in layers]

    async def get(digest: str) -> bytes:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(get(digest) for digest in digests))

    assert bodies == layers
    storage = client.app[storage_key]
    assert storage.writable  # a blob that found no room is no fault of the disk
    kept = 0
    for _ in range(100):  # renamed just after each client's last byte
        kept = sum(blob_file_in(small_volume, digest).exists() for digest in digests)
        if kept >= 2 and not list(storage.tmp.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert kept == 2
    assert list(storage.tmp.iterdir()) == []


async def test_a_disk_smaller_than_the_bound_makes_room_for_the_next_blob(
    hub: FakeHub, small_volume: Path, make_client: MakeClient
) -> None:
    """A 24 MiB volume under a 1 GiB bound, two 9 MiB blobs cached: the third finds no room.
    It is relayed, and the least recently read blob goes, so its next pull keeps it (before,
    nothing was evicted below the bound, and every blob after was relayed for good)."""
    storage = StorageConfig(path=small_volume, max_size=1024 * MIB)
    client = await make_client(storage=storage)
    first, second, third = (os.urandom(9 * MIB) for _ in range(3))
    digests = [hub.content.add_blob(layer) for layer in (first, second, third)]
    for digest in digests[:2]:
        await fetch_blob(client, digest)
    assert all(blob_file_in(small_volume, digest).exists() for digest in digests[:2])

    resp = await client.get(f"/v2/library/app/blobs/{digests[2]}")
    assert (resp.status, await resp.read()) == (200, third)
    for _ in range(100):  # the pass runs in the background
        if not blob_file_in(small_volume, digests[0]).exists():
            break
        await asyncio.sleep(0.05)
    assert await fetch_blob(client, digests[2]) == third

    assert not blob_file_in(small_volume, digests[0]).exists()
    assert blob_file_in(small_volume, digests[1]).exists()
    assert blob_file_in(small_volume, digests[2]).exists()
    assert await metric(client, 'mirror_evictions_total{reason="size"}') == 1


async def test_the_disk_filling_under_a_worker_s_download_leaves_the_other_s_clients_relayed(
    hub: FakeHub, small_volume: Path, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one volume: one fetches a blob, a client of the other follows its temp
    file; the volume fills mid-download. The fetching worker's client is relayed from the
    upstream, as ever; so is the other's, whole and right (it was cut: "another process
    failed it")."""
    monkeypatch.setattr(downloads, "RESERVE_AHEAD", MIB)  # the writes past 1 MiB can fail
    hub.cdn_delay = 0.005
    storage = StorageConfig(path=small_volume)
    owner, other = [await make_client(workers=2, storage=storage) for _ in range(2)]
    layer = os.urandom(8 * MIB)
    digest = hub.content.add_blob(layer)

    async def get(client: Client) -> tuple[int, bytes]:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        return resp.status, await resp.read()

    def started() -> bool:
        return any(path.stat().st_size > 0 for path in (small_volume / "tmp").glob("blob-*"))

    fetching = asyncio.create_task(get(owner))
    for _ in range(200):
        if started():
            break
        await asyncio.sleep(0.01)
    following = asyncio.create_task(get(other))
    await asyncio.sleep(0.2)  # the other worker's client follows the temp file
    assert not fetching.done()
    await asyncio.to_thread(fill_filesystem, small_volume / "filler")

    assert await fetching == (200, layer)
    assert await following == (200, layer)


async def test_an_unbounded_cache_makes_no_room(
    hub: FakeHub, small_volume: Path, make_client: MakeClient
) -> None:
    """`max_size: null` keeps what it holds: a blob the full disk has no room for is
    relayed, and nothing is evicted for it."""
    client = await make_client(storage=StorageConfig(path=small_volume))
    layers = [os.urandom(9 * MIB) for _ in range(3)]
    digests = [hub.content.add_blob(layer) for layer in layers]
    for digest in digests[:2]:
        await fetch_blob(client, digest)
    resp = await client.get(f"/v2/library/app/blobs/{digests[2]}")
    assert (resp.status, await resp.read()) == (200, layers[2])
    await asyncio.sleep(0.5)  # a pass would have run by now

    assert all(blob_file_in(small_volume, digest).exists() for digest in digests[:2])
    assert await metric(client, 'mirror_evictions_total{reason="size"}') == 0


async def test_making_room_frees_what_is_lacking_not_a_tenth_of_the_cache_more(
    hub: FakeHub, small_volume: Path, make_client: MakeClient
) -> None:
    """Twenty 1 MiB blobs, the disk then full: room for a 3 MiB blob (3.375 MiB with its
    margin) takes four of them, not the six the low water mark of a size pass would. A stop
    does not wait for a pass making room that waits for its turn."""
    client = await make_client(storage=StorageConfig(path=small_volume, max_size=1024 * MIB))
    digests = [hub.content.add_blob(os.urandom(MIB)) for _ in range(20)]
    for digest in digests:
        await fetch_blob(client, digest)
    await asyncio.to_thread(fill_filesystem, small_volume / "filler")
    evictor = client.app[evictor_key]

    evictor.make_room(3 * MIB)
    evictions = 'mirror_evictions_total{reason="size"}'
    for _ in range(100):
        if await metric(client, evictions):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the whole pass

    assert await metric(client, evictions) == 4
    assert sum(blob_file_in(small_volume, d).exists() for d in digests) == 16
    (small_volume / "filler").unlink()
    turn = evictor._tally.take_turn()
    assert turn is not None  # another pass (a worker's, `mirror gc`) holds the turn
    await asyncio.to_thread(fill_filesystem, small_volume / "filler")
    evictor.make_room(3 * MIB)
    await asyncio.wait_for(evictor.close(), 10)
    turn.release()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_download_s_promised_room_is_not_given_to_a_small_blob(
    small_volume: Path, processes: int
) -> None:
    """A 19 MiB download, 1 MiB reserved, 18 promised: a 10 MiB blob (reserved whole at
    once, as any layer under 64 MiB is) finds no room beyond the promise, in the same
    process or another on the volume (workers; before, each process counted only its own
    promises). Once the download's file is gone, so is its promise."""
    one = Storage(small_volume)
    other = one if processes == 1 else Storage(small_volume)
    one.tmp.mkdir(parents=True)
    big = one.new_temp(19 * MIB, MIB)
    try:
        with pytest.raises(OSError) as refused:
            other.new_temp(10 * MIB, 64 * MIB)
        assert refused.value.errno == errno.ENOSPC
        assert [path.name for path in other.tmp.iterdir()] == [big[1].name]
    finally:
        one.discard(*big)
    other.discard(*other.new_temp(10 * MIB, 64 * MIB))


def test_a_dead_worker_s_download_keeps_its_promise_for_the_one_taking_it_over(
    small_volume: Path,
) -> None:
    """A worker dies mid-download (its temp file left for another to take over): the room
    it was promised stays promised, so the rest of its blob still fits when it is carried
    on (before, the promise died with the process)."""
    dead, other = Storage(small_volume), Storage(small_volume)
    dead.tmp.mkdir(parents=True)
    fd, temp = dead.new_temp(19 * MIB, MIB)
    os.pwrite(fd, os.urandom(MIB), 0)
    os.close(fd)  # the process is gone; its temp file is there to be taken over
    try:
        with pytest.raises(OSError) as refused:
            other.new_temp(10 * MIB, 64 * MIB)
        assert refused.value.errno == errno.ENOSPC
    finally:
        temp.unlink()


async def test_concurrent_cold_blobs_over_two_workers_take_only_the_room_the_volume_has(
    hub: FakeHub, small_volume: Path, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four 9 MiB blobs pulled at once into a 24 MiB volume, through two workers in turn:
    two kept, the others relayed at once, every body right and the cache still writable
    (before, each worker counted its own downloads' promises only: both of a worker's
    downloads passed while the other's took the room, and no more than one was kept)."""
    monkeypatch.setattr(downloads, "RESERVE_AHEAD", MIB)
    hub.cdn_delay = 0.002  # the four downloads overlap
    storage = StorageConfig(path=small_volume)
    workers = [await make_client(workers=2, storage=storage) for _ in range(2)]
    layers = [os.urandom(9 * MIB) for _ in range(4)]
    digests = [hub.content.add_blob(layer) for layer in layers]

    async def get(client: Client, digest: str) -> bytes:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(
        *(get(workers[i % 2], digest) for i, digest in enumerate(digests))
    )

    assert bodies == layers
    assert all(client.app[storage_key].writable for client in workers)
    tmp = small_volume / "tmp"
    kept = 0
    for _ in range(100):  # renamed just after each client's last byte
        kept = sum(blob_file_in(small_volume, digest).exists() for digest in digests)
        if kept >= 2 and not list(tmp.glob("blob-*")):
            break
        await asyncio.sleep(0.05)
    assert kept == 2
    assert list(tmp.glob("blob-*")) == []


def test_followers_take_the_owner_s_upstream_failures_as_theirs() -> None:
    """A failure the upstream caused leaves followers its marker (they answer it, not a
    relay that fails alike); only the owner's disk leaves them to relay."""
    assert _shared(BlobTooLarge("over max_blob_size"))
    assert _shared(TooManyRequests("limited"))
    assert _shared(UpstreamUnavailable("down"))
    assert not _shared(CacheWriteFailed("disk full"))
    assert not _shared(Uncacheable("too large for the cache"))


async def test_cache_evicts_least_recently_read_blobs(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    storage = StorageConfig(path=config.storage.path, max_size=1_000_000)
    client = await make_client(storage=storage)
    digests = [hub.content.add_blob(os.urandom(300_000)) for _ in range(3)]
    for age, digest in zip((300, 200, 100), digests, strict=True):
        await fetch_blob(client, digest)
        past = time.time() - age
        os.utime(blob_file(config, digest), (past, past))
    # Reading the oldest makes it the most recent: the second one goes instead.
    await fetch_blob(client, digests[0])
    newest = hub.content.add_blob(os.urandom(300_000))

    await fetch_blob(client, newest)  # 1.2 MB: the background pass is set off
    # The pass counts each eviction just after its unlink: wait for the count.
    for _ in range(100):
        if await metric(client, 'mirror_evictions_total{reason="size"}') == 1:
            break
        await asyncio.sleep(0.05)

    assert [blob_file(config, d).exists() for d in digests] == [True, False, True]
    assert blob_file(config, newest).exists()
    assert await metric(client, 'mirror_evictions_total{reason="size"}') == 1
    hub.reset_stats()
    resp = await client.get(f"/v2/library/app/blobs/{digests[1]}")
    assert resp.status == 200  # evicted, then fetched again: never an empty answer
    assert len(await resp.read()) == 300_000
    assert hub.stats["cdn_get"] == 1


async def test_idle_blobs_are_evicted(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    storage = StorageConfig(path=config.storage.path, max_idle=3600)
    client = await make_client(storage=storage)
    old, recent = (hub.content.add_blob(os.urandom(1000)) for _ in range(2))
    for digest in (old, recent):
        await fetch_blob(client, digest)
    past = time.time() - 7200
    os.utime(blob_file(config, old), (past, past))

    await client.app[evictor_key].evict()

    assert not blob_file(config, old).exists()
    assert blob_file(config, recent).exists()


def test_eviction_skips_blobs_being_read() -> None:
    blobs = [CachedBlob(f"/x/{n}", f"sha256:{n}", 100, float(n)) for n in range(4)]

    victims = choose_victims(blobs, 400, 250, None, {"sha256:0"}, now=10.0)

    assert [blob.digest for blob, _ in victims] == ["sha256:1", "sha256:2"]


def test_a_blob_near_the_bound_does_not_take_itself_out_with_the_rest() -> None:
    """max_size 64, blobs of 60: the second landing passes the bound. The first goes; the
    one just landed stays (it fits alone), though the low water mark (57.6) is not met."""
    blobs = [CachedBlob(f"/x/{n}", f"sha256:{n}", 60, float(n)) for n in range(2)]

    victims = choose_victims(blobs, 120, 64, None, set(), now=10.0)

    assert [(blob.digest, why) for blob, why in victims] == [("sha256:0", "size")]


async def test_evictor_stops_when_cancelled_as_it_is_woken(tmp_path: Path) -> None:
    """Shutdown cancels the evictor; a blob landing at that moment wakes it too. On Python
    3.11 `asyncio.wait_for` dropped such a cancellation, and the app's cleanup hung."""
    storage = Storage(tmp_path / "data")
    await storage.open()
    evictor = Evictor(storage, Metrics(), max_size=10, max_idle=None, busy=lambda: ())
    task = asyncio.create_task(evictor.run())
    await asyncio.sleep(0.5)  # the first pass is over: it waits to be woken

    evictor.added(100)  # over the bound: wakes it...
    task.cancel()  # ...in the same turn of the loop as shutdown cancels it

    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, "the cancelled evictor kept running"
    assert task.cancelled()


async def test_blob_evicted_while_being_read_is_sent_whole(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    storage = StorageConfig(path=config.storage.path, max_size=10_000_000)
    client = await make_client(storage=storage)
    layer = os.urandom(8_000_000)
    digest = hub.content.add_blob(layer)
    await (await client.get(f"/v2/library/app/blobs/{digest}")).read()

    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    head = await resp.content.readexactly(1000)
    await client.app[evictor_key].evict(max_size=1)

    assert head + await resp.read() == layer
