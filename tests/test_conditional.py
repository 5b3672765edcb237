"""One ETag per object (its digest), 304s for If-None-Match, If-Range, Cache-Control."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, Config
from tests.conftest import MakeClient
from tests.fakehub import FakeHub

Client = TestClient[Any, Any]
DOCKER_ACCEPT = {
    "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
}
IMMUTABLE = "max-age=31536000, immutable"


async def cache_blob(client: Client, config: Config, digest: str) -> None:
    """GET the blob and wait until its file is in the cache (the rename follows the body)."""
    await (await client.get(f"/v2/library/app/blobs/{digest}")).read()
    algorithm, hexpart = digest.split(":")
    path = config.storage.path / "blobs" / algorithm / hexpart[:2] / hexpart
    for _ in range(250):
        if path.exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("blob never landed in the cache")


def validators(resp: Any) -> dict[str, str | None]:
    return {name: resp.headers.get(name) for name in ("ETag", "Last-Modified", "Cache-Control")}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_blob_etag_is_the_digest_cold_and_warm(
    hub: FakeHub, client: Client, config: Config, method: str
) -> None:
    digest = hub.content.add_blob(os.urandom(70_000))
    url = f"/v2/library/app/blobs/{digest}"

    cold = await client.request(method, url)
    await cold.read()
    await cache_blob(client, config, digest)
    hub.reset_stats()
    warm = await client.request(method, url)

    expected = {"ETag": f'"{digest}"', "Last-Modified": None, "Cache-Control": IMMUTABLE}
    assert validators(cold) == validators(warm) == expected
    assert cold.headers["Docker-Content-Digest"] == warm.headers["Docker-Content-Digest"] == digest
    assert hub.stats["cdn_get"] == 0  # the second answer did come from the cache


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("quoted", [True, False], ids=["quoted", "unquoted"])
async def test_blob_if_none_match_is_304_without_body(
    hub: FakeHub, client: Client, config: Config, warm: bool, method: str, quoted: bool
) -> None:
    digest = hub.content.add_blob(os.urandom(5000))
    if warm:
        await cache_blob(client, config, digest)
    hub.reset_stats()
    tag = f'W/"x", "{digest}"' if quoted else digest

    resp = await client.request(
        method, f"/v2/library/app/blobs/{digest}", headers={"If-None-Match": tag}
    )

    assert resp.status == 304
    assert await resp.read() == b""
    assert resp.headers["ETag"] == f'"{digest}"'
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Cache-Control"] == IMMUTABLE
    assert hub.stats["cdn_get"] == 0  # nothing downloaded to say "not modified"


async def test_blob_if_none_match_star_and_other_etag(
    hub: FakeHub, client: Client, config: Config
) -> None:
    digest = hub.content.add_blob(os.urandom(5000))
    await cache_blob(client, config, digest)
    url = f"/v2/library/app/blobs/{digest}"

    star = await client.get(url, headers={"If-None-Match": "*"})
    other = await client.get(url, headers={"If-None-Match": '"sha256:' + "1" * 64 + '"'})

    assert star.status == 304
    assert other.status == 200
    assert len(await other.read()) == 5000


async def test_unknown_blob_with_if_none_match_is_still_404(hub: FakeHub, client: Client) -> None:
    digest = "sha256:" + "2" * 64

    resp = await client.get(f"/v2/library/app/blobs/{digest}", headers={"If-None-Match": "*"})

    assert resp.status == 404


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
async def test_range_with_matching_if_range_is_206(
    hub: FakeHub, client: Client, config: Config, warm: bool
) -> None:
    layer = os.urandom(5000)
    digest = hub.content.add_blob(layer)
    if warm:
        await cache_blob(client, config, digest)

    resp = await client.get(
        f"/v2/library/app/blobs/{digest}",
        headers={"Range": "bytes=100-199", "If-Range": f'"{digest}"'},
    )

    assert resp.status == 206
    assert resp.headers["Content-Range"] == "bytes 100-199/5000"
    assert resp.headers["ETag"] == f'"{digest}"'
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await resp.read() == layer[100:200]


@pytest.mark.parametrize("warm", [True, False], ids=["cached", "cold"])
@pytest.mark.parametrize(
    "if_range",
    ['"sha256:' + "3" * 64 + '"', "Wed, 21 Oct 2015 07:28:00 GMT", 'W/"{digest}"'],
    ids=["other-etag", "date", "weak"],
)
async def test_range_with_stale_if_range_gets_the_whole_blob(
    hub: FakeHub, client: Client, config: Config, warm: bool, if_range: str
) -> None:
    layer = os.urandom(5000)
    digest = hub.content.add_blob(layer)
    if warm:
        await cache_blob(client, config, digest)

    resp = await client.get(
        f"/v2/library/app/blobs/{digest}",
        headers={"Range": "bytes=100-199", "If-Range": if_range.replace("{digest}", digest)},
    )

    assert resp.status == 200
    assert "Content-Range" not in resp.headers
    assert await resp.read() == layer


# --- manifests ----------------------------------------------------------------------------


@pytest.fixture
async def image(hub: FakeHub) -> dict[str, Any]:
    return hub.content.add_image("library/app", "latest", [b"layer"])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_manifest_if_none_match_is_304(
    hub: FakeHub, client: Client, image: dict[str, Any], method: str, by: str
) -> None:
    ref = "latest" if by == "tag" else image["digest"]
    url = f"/v2/library/app/manifests/{ref}"
    first = await client.request(method, url, headers=DOCKER_ACCEPT)
    etag = first.headers["ETag"]

    again = await client.request(method, url, headers={**DOCKER_ACCEPT, "If-None-Match": etag})

    assert etag == f'"{image["digest"]}"'
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    assert again.headers["Docker-Content-Digest"] == image["digest"]


async def test_tag_etag_follows_the_tag(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=0))
    old = f'"{image["digest"]}"'
    moved = hub.content.add_image("library/app", "latest", [b"another layer"])

    resp = await client.get(
        "/v2/library/app/manifests/latest", headers={**DOCKER_ACCEPT, "If-None-Match": old}
    )

    assert resp.status == 200
    assert resp.headers["ETag"] == f'"{moved["digest"]}"'
    assert await resp.read() == moved["manifest"]


async def test_manifest_cache_control(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=600))

    by_digest = await client.get(
        f"/v2/library/app/manifests/{image['digest']}", headers=DOCKER_ACCEPT
    )
    by_tag = await client.get("/v2/library/app/manifests/latest", headers=DOCKER_ACCEPT)

    assert by_digest.headers["Cache-Control"] == IMMUTABLE
    seconds = int(by_tag.headers["Cache-Control"].removeprefix("max-age="))
    assert 0 < seconds <= 600
    assert by_tag.headers["Vary"] == "Accept"


async def test_stale_tag_is_not_to_be_cached(
    hub: FakeHub, make_client: MakeClient, image: dict[str, Any]
) -> None:
    client = await make_client(cache=CacheConfig(tag_ttl=0))
    await (await client.get("/v2/library/app/manifests/latest", headers=DOCKER_ACCEPT)).read()
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/manifests/latest", headers=DOCKER_ACCEPT)

    assert resp.status == 200
    assert resp.headers["Warning"].startswith("110")
    assert resp.headers["Cache-Control"] == "max-age=0"


async def test_every_blob_and_manifest_answer_carries_the_digest(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """Docker-Content-Digest and ETag on each answer kind: GET, HEAD, 206, cold and warm."""
    image = hub.content.add_image("library/app", "latest", [os.urandom(40_000)])
    layer = image["layers"][0]
    blob = f"/v2/library/app/blobs/{layer}"
    requests = [
        ("HEAD", blob, {}),  # cold: HEAD first, nothing downloaded yet
        ("GET", blob, {"Range": "bytes=10-19"}),  # cold 206
        ("GET", blob, {}),
    ]
    for ref in ("latest", image["digest"]):
        requests += [
            (m, f"/v2/library/app/manifests/{ref}", DOCKER_ACCEPT) for m in ("HEAD", "GET")
        ]
    seen = []
    for round_ in ("cold", "warm"):
        for method, path, headers in requests:
            resp = await client.request(method, path, headers=headers)
            await resp.read()
            want = layer if "/blobs/" in path else image["digest"]
            seen.append((round_, method, resp.status, resp.headers.get("Docker-Content-Digest")))
            assert resp.headers.get("Docker-Content-Digest") == want, seen[-1]
            assert resp.headers.get("ETag") == f'"{want}"', seen[-1]
        await cache_blob(client, config, layer)
    assert {status for *_, status, _ in seen} == {200, 206}
