"""Manifests: cached by digest, tags within their TTL answered locally, revalidated by HEAD."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, RedisConfig
from mirror.web.keys import metrics_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub

Client = TestClient[Any, Any]
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_ACCEPT = [f"{DOCKER_V2}, {DOCKER_LIST}", f"{OCI_INDEX}, {OCI_MANIFEST}"]


def accept_headers(values: list[str]) -> list[tuple[str, str]]:
    """Several Accept lines, as Go clients send them."""
    return [("Accept", value) for value in values]


async def pull_manifest(client: Client, repo: str, ref: str, method: str = "GET") -> Any:
    return await client.request(
        method, f"/v2/{repo}/manifests/{ref}", headers=accept_headers(DOCKER_ACCEPT)
    )


@pytest.fixture
async def tagged(hub: FakeHub) -> dict[str, Any]:
    return hub.content.add_image("library/nginx", "latest", [b"layer-1"])


async def test_get_by_tag_serves_manifest_with_registry_headers(
    hub: FakeHub, client: Client, tagged: dict[str, Any]
) -> None:
    resp = await pull_manifest(client, "library/nginx", "latest")

    assert resp.status == 200
    assert await resp.read() == tagged["manifest"]
    assert resp.headers["Content-Type"] == DOCKER_V2
    assert resp.headers["Docker-Content-Digest"] == tagged["digest"]
    assert resp.headers["ETag"] == f'"{tagged["digest"]}"'
    assert resp.headers["Content-Length"] == str(len(tagged["manifest"]))


async def test_head_without_length_upstream_is_answered_with_the_manifests_length(
    hub: FakeHub, make_client: MakeClient, tagged: dict[str, Any]
) -> None:
    """An upstream HEAD with no Content-Length: containerd takes a HEAD's length for the
    manifest's size, so the mirror's says the real one (from a GET, or from the cached
    bytes on revalidation), never 0."""
    hub.manifest_head_length = False
    client = await make_client(cache=CacheConfig(tag_ttl=0))
    size = str(len(tagged["manifest"]))

    for method in ("HEAD", "GET", "HEAD", "HEAD"):
        resp = await pull_manifest(client, "library/nginx", "latest", method)
        assert resp.status == 200
        assert resp.headers["Content-Length"] == size
        assert resp.headers["Docker-Content-Digest"] == tagged["digest"]
    assert hub.stats["manifest_get"] == 1  # the first HEAD's: the others knew the bytes

    other = hub.content.add_image("library/redis", "7", [b"layer-2"])
    resp = await pull_manifest(client, "library/redis", other["digest"], "HEAD")
    assert resp.headers["Content-Length"] == str(len(other["manifest"]))


async def test_a_manifest_over_the_limit_is_refused_alike_by_head_and_get(
    hub: FakeHub, client: Client
) -> None:
    """A HEAD whose length is over the manifest limit gets the GET's refusal, and records
    no tag that a GET (by tag or by the digest the HEAD named) would then fail."""
    big = {"schemaVersion": 2, "mediaType": DOCKER_V2, "annotations": {"x": "a" * 4_194_304}}
    digest = hub.content.add_manifest("library/big", json.dumps(big).encode(), DOCKER_V2, "v1")

    for method, ref in (("HEAD", "v1"), ("GET", "v1"), ("HEAD", "v1"), ("HEAD", digest)):
        resp = await pull_manifest(client, "library/big", ref, method)
        assert resp.status == 502, (method, ref)
        if method == "GET":
            assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert hub.stats["manifest_get"] == 0  # the length the HEAD told refuses the GET too


async def test_head_carries_the_get_headers_without_body(
    client: Client, tagged: dict[str, Any]
) -> None:
    for ref in ("latest", tagged["digest"]):
        resp = await pull_manifest(client, "library/nginx", ref, "HEAD")
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == tagged["digest"]
        assert resp.headers["Content-Length"] == str(len(tagged["manifest"]))
        assert resp.headers["Content-Type"] == DOCKER_V2
        assert await resp.read() == b""


async def test_every_accept_line_is_forwarded(hub: FakeHub, client: Client, tagged: Any) -> None:
    await pull_manifest(client, "library/nginx", "latest")

    assert set(hub.stats.accept_seen[-1]) == {DOCKER_V2, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST}


async def test_docker_pull_sequence_spends_one_upstream_get(
    hub: FakeHub, client: Client, tagged: dict[str, Any]
) -> None:
    """HEAD the tag, GET by digest: the HEAD costs no pull, the GET costs one."""
    head = await pull_manifest(client, "library/nginx", "latest", "HEAD")
    get = await pull_manifest(client, "library/nginx", head.headers["Docker-Content-Digest"])

    assert await get.read() == tagged["manifest"]
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 1)


async def test_within_ttl_a_tag_makes_no_upstream_request(
    hub: FakeHub, make_client: MakeClient, metadata_config: RedisConfig, tagged: Any
) -> None:
    client = await make_client(redis=metadata_config)
    await (await pull_manifest(client, "library/nginx", "latest")).read()
    hub.reset_stats()

    for method in ("GET", "HEAD", "GET"):
        resp = await pull_manifest(client, "library/nginx", "latest", method)
        assert resp.status == 200
    by_digest = await pull_manifest(client, "library/nginx", tagged["digest"])

    assert await by_digest.read() == tagged["manifest"]
    assert hub.stats["manifest_get"] == hub.stats["manifest_head"] == hub.stats["token"] == 0


async def test_expired_tag_is_revalidated_with_head_only(
    hub: FakeHub, make_client: MakeClient, metadata_config: RedisConfig, tagged: Any
) -> None:
    client = await make_client(redis=metadata_config, cache=CacheConfig(tag_ttl=0))
    await (await pull_manifest(client, "library/nginx", "latest")).read()
    hub.reset_stats()

    resp = await pull_manifest(client, "library/nginx", "latest")

    assert await resp.read() == tagged["manifest"]
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 0)
    metrics = await (await client.get("/metrics")).text()
    assert 'mirror_tag_revalidations_total{result="unchanged"} 1.0' in metrics


async def test_expired_tag_that_moved_is_fetched_by_get(
    hub: FakeHub, make_client: MakeClient, metadata_config: RedisConfig, tagged: Any
) -> None:
    client = await make_client(redis=metadata_config, cache=CacheConfig(tag_ttl=0))
    await (await pull_manifest(client, "library/nginx", "latest")).read()
    moved = hub.content.add_image("library/nginx", "latest", [b"layer-2"])
    hub.reset_stats()

    resp = await pull_manifest(client, "library/nginx", "latest")

    assert await resp.read() == moved["manifest"]
    assert resp.headers["Docker-Content-Digest"] == moved["digest"]
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 1)


async def test_an_answer_by_tag_is_kept_only_while_its_record_is_fresh(
    hub: FakeHub, make_client: MakeClient, metadata_config: RedisConfig, tagged: Any
) -> None:
    """Repeated answers by tag come from what the first one found (cache/manifests.py
    `_standing`): each still counts its hits and its shrinking max-age, and the tag's TTL
    still ends it: a tag that moved upstream is served moved after it."""
    ttl = 3
    client = await make_client(redis=metadata_config, cache=CacheConfig(tag_ttl=ttl))
    checked = time.time()  # the first pull checks the tag: its record is no older
    await (await pull_manifest(client, "library/nginx", "latest")).read()
    written = time.time()  # and no younger: the waits below count from here
    registry = client.app[metrics_key].registry

    def hits(kind: str) -> float:
        labels = {"kind": kind, "result": "hit"}
        return registry.get_sample_value("mirror_cache_requests_total", labels) or 0.0

    def max_age(resp: Any) -> int:
        return int(resp.headers["Cache-Control"].removeprefix("max-age="))

    before = (hits("tag"), hits("manifest"))
    for method in ("GET", "HEAD", "GET"):
        resp = await pull_manifest(client, "library/nginx", "latest", method)
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == tagged["digest"]
        # What is left of the TTL: no more than the record's age took off.
        assert int(ttl - (time.time() - checked)) <= max_age(resp) < ttl
    assert await resp.read() == tagged["manifest"]
    assert (hits("tag") - before[0], hits("manifest") - before[1]) == (3, 2)
    moved = hub.content.add_image("library/nginx", "latest", [b"layer-2"])
    await asyncio.sleep(max(0.0, written + 1.2 - time.time()))
    resp = await pull_manifest(client, "library/nginx", "latest")
    assert resp.headers["Cache-Control"] in ("max-age=0", "max-age=1")
    assert resp.headers["Docker-Content-Digest"] == tagged["digest"]  # the record still holds
    await asyncio.sleep(max(0.0, written + ttl - time.time()))  # the TTL has passed

    resp = await pull_manifest(client, "library/nginx", "latest")

    assert resp.headers["Docker-Content-Digest"] == moved["digest"]
    assert await resp.read() == moved["manifest"]
    assert resp.headers["Cache-Control"] == f"max-age={ttl}"


async def test_head_of_uncached_tag_never_spends_a_get(hub: FakeHub, client: Client) -> None:
    hub.content.add_image("library/redis", "7", [b"r"])

    resp = await pull_manifest(client, "library/redis", "7", "HEAD")

    assert resp.status == 200
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 0)
    assert hub.ratelimit_remaining == 100


async def test_a_get_of_a_new_tag_whose_bytes_are_cached_spends_no_pull(
    hub: FakeHub, client: Client
) -> None:
    """podman, CRI-O and skopeo GET a tag outright. A new tag name of a digest held here
    (`latest` beside `1.2.3`) is resolved with a HEAD and answered from the cache: no pull
    spent, and served past the upstream's pull limit."""
    image = hub.content.add_image("library/app", "1.2.3", [b"a layer"])
    assert (await pull_manifest(client, "library/app", "1.2.3")).status == 200
    hub.content.add_manifest("library/app", image["manifest"], DOCKER_V2, "latest")
    hub.ratelimit_remaining = 0
    hub.reset_stats()

    resp = await pull_manifest(client, "library/app", "latest")

    assert resp.status == 200, await resp.text()
    assert await resp.read() == image["manifest"]
    assert resp.headers["Docker-Content-Digest"] == image["digest"]
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 0)


async def test_a_new_tag_of_bytes_held_for_another_repository_opens_its_blobs_too(
    hub: FakeHub, client: Client
) -> None:
    """Answered from the cache after a HEAD, the tag's manifest names its config and
    layers as the repository's, as a fetch of it would: served with no upstream HEAD each,
    and the repository catalogued."""
    image = hub.content.add_image("org-a/app", "1", [b"a layer"])
    assert (await pull_manifest(client, "org-a/app", "1")).status == 200
    for blob in (image["config"], *image["layers"]):
        assert (await client.get(f"/v2/org-a/app/blobs/{blob}")).status == 200
    hub.content.add_manifest("org-b/app", image["manifest"], DOCKER_V2, "1")
    hub.reset_stats()

    assert (await pull_manifest(client, "org-b/app", "1")).status == 200
    for blob in (image["config"], *image["layers"]):
        resp = await client.get(f"/v2/org-b/app/blobs/{blob}")
        assert resp.status == 200 and await resp.read() == hub.content.blobs[blob]

    assert hub.stats["blob_head"] == hub.stats["blob_get"] == hub.stats["manifest_get"] == 0
    catalog = await (await client.get("/v2/_catalog")).json()
    assert "org-b/app" in catalog["repositories"]


async def test_a_get_of_an_uncached_tag_spends_one_pull(hub: FakeHub, client: Client) -> None:
    """Its HEAD, then its digest's GET: the one pull a GET of the tag would spend."""
    image = hub.content.add_image("library/app", "v1", [b"a layer"])

    resp = await pull_manifest(client, "library/app", "v1")

    assert await resp.read() == image["manifest"]
    assert (hub.stats["manifest_head"], hub.stats["manifest_get"]) == (1, 1)
    assert hub.ratelimit_remaining == 99
    assert (await pull_manifest(client, "library/app", "v1")).status == 200  # kept
    assert hub.stats["manifest_get"] == 1


async def test_multi_arch_index_and_its_manifests(hub: FakeHub, client: Client) -> None:
    amd64 = hub.content.add_image("library/multi", None, [b"amd"], OCI_MANIFEST)
    arm64 = hub.content.add_image("library/multi", None, [b"arm"], OCI_MANIFEST)
    entries = [
        (
            image["digest"],
            OCI_MANIFEST,
            len(image["manifest"]),
            {"architecture": arch, "os": "linux"},
        )
        for image, arch in ((amd64, "amd64"), (arm64, "arm64"))
    ]
    index = hub.content.add_index("library/multi", "latest", entries)

    resp = await pull_manifest(client, "library/multi", "latest")
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert resp.headers["Docker-Content-Digest"] == index
    listed = [m["digest"] for m in json.loads(await resp.read())["manifests"]]
    for digest, image in zip(listed, (amd64, arm64), strict=True):
        child = await pull_manifest(client, "library/multi", digest)
        assert child.headers["Content-Type"] == OCI_MANIFEST
        assert await child.read() == image["manifest"]


async def test_cached_type_not_accepted_is_404_without_asking_upstream(
    hub: FakeHub, client: Client, tagged: Any
) -> None:
    await (await pull_manifest(client, "library/nginx", "latest")).read()
    hub.reset_stats()

    resp = await client.get("/v2/library/nginx/manifests/latest", headers={"Accept": OCI_MANIFEST})

    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert hub.stats["manifest_get"] == hub.stats["manifest_head"] == 0


async def test_manifest_whose_bytes_do_not_match_is_refused_and_not_cached(
    hub: FakeHub, client: Client, tagged: dict[str, Any]
) -> None:
    digest = tagged["digest"]
    hub.content.manifests["library/nginx"][digest] = (DOCKER_V2, b'{"tampered": true}')

    resp = await pull_manifest(client, "library/nginx", digest)

    assert resp.status >= 500
    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    hub.content.manifests["library/nginx"][digest] = (DOCKER_V2, tagged["manifest"])
    hub.reset_stats()
    resp = await pull_manifest(client, "library/nginx", digest)
    assert await resp.read() == tagged["manifest"]
    assert hub.stats["manifest_get"] == 1  # the bad bytes were not kept


def by_sha512(hub: FakeHub, repo: str, digest: str, body: bytes | None = None) -> str:
    """The upstream answering for `digest`'s manifest by its sha512 too (`body` instead,
    for one that lies); that sha512."""
    media_type, kept = hub.content.manifests[repo][digest]
    sha512 = "sha512:" + hashlib.sha512(kept).hexdigest()
    hub.content.manifests[repo][sha512] = (media_type, kept if body is None else body)
    return sha512


async def test_a_manifest_by_its_sha512_is_served_alike_by_head_and_get_and_kept_once(
    hub: FakeHub, client: Client, tagged: dict[str, Any]
) -> None:
    """By a sha512 digest: checked against it, kept as its sha256 (one copy, one record)
    and answered under the digest asked for, HEAD and GET alike."""
    sha512 = by_sha512(hub, "library/nginx", tagged["digest"])
    for method in ("HEAD", "GET", "HEAD", "GET"):
        resp = await pull_manifest(client, "library/nginx", sha512, method)
        body = await resp.read()
        assert resp.status == 200, (method, body)
        assert resp.headers["Docker-Content-Digest"] == sha512
        assert resp.headers["ETag"] == f'"{sha512}"'
        assert resp.headers["Content-Length"] == str(len(tagged["manifest"]))
        assert body == (tagged["manifest"] if method == "GET" else b"")
    assert hub.stats["manifest_get"] == 1 and hub.stats["manifest_head"] == 0
    # Its sha256 is answered from that one copy.
    resp = await pull_manifest(client, "library/nginx", tagged["digest"])
    assert await resp.read() == tagged["manifest"]
    assert resp.headers["Docker-Content-Digest"] == tagged["digest"]
    assert hub.stats["manifest_get"] == 1
    resp = await client.get(
        f"/v2/library/nginx/manifests/{sha512}", headers={"If-None-Match": f'"{sha512}"'}
    )
    assert resp.status == 304


async def test_a_manifest_not_matching_its_sha512_is_refused_and_not_kept(
    hub: FakeHub, client: Client, tagged: dict[str, Any]
) -> None:
    sha512 = by_sha512(hub, "library/nginx", tagged["digest"], b'{"tampered": true}')
    for method in ("GET", "HEAD"):
        resp = await pull_manifest(client, "library/nginx", sha512, method)
        await resp.read()
        assert resp.status != 200, method
    by_sha512(hub, "library/nginx", tagged["digest"])
    hub.reset_stats()
    resp = await pull_manifest(client, "library/nginx", sha512)
    assert resp.status == 200 and await resp.read() == tagged["manifest"]
    assert hub.stats["manifest_get"] == 1  # the bad bytes were not kept


async def test_a_sha512_another_repository_fetched_is_refused_as_if_never_pulled(
    hub: FakeHub, make_client: MakeClient, tagged: dict[str, Any]
) -> None:
    """A repository that does not hold a manifest is told so in the same words whether or
    not another repository pulled it by its sha512 here (nor is its sha256 named)."""
    sha512 = by_sha512(hub, "library/nginx", tagged["digest"])
    hub.content.add_image("library/other", "latest", [b"other"])
    cold = await make_client()
    answers = []
    for warm in (False, True):
        client = await make_client() if warm else cold
        if warm:
            await (await pull_manifest(client, "library/nginx", sha512)).read()
        for method in ("GET", "HEAD"):
            resp = await pull_manifest(client, "library/other", sha512, method)
            answers.append((warm, method, resp.status, await resp.read()))
    assert [status for *_, status, _ in answers] == [404] * 4
    assert answers[0][3] == answers[2][3] and tagged["digest"] not in answers[2][3].decode()


async def test_cache_survives_a_restart_with_redis(
    hub: FakeHub, make_client: MakeClient, redis_server: Any, tagged: Any
) -> None:
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_server.url)
    await conn.flushdb()
    await conn.aclose()
    first = await make_client(redis=RedisConfig(url=redis_server.url))
    await (await pull_manifest(first, "library/nginx", "latest")).read()
    await first.close()
    hub.reset_stats()

    second = await make_client(redis=RedisConfig(url=redis_server.url))
    resp = await pull_manifest(second, "library/nginx", "latest")

    assert await resp.read() == tagged["manifest"]
    assert hub.stats["manifest_get"] == hub.stats["manifest_head"] == 0
