"""Referrers for every upstream: its API, else the tag schema, else an empty index.

Two upstreams behind one mirror: the in-memory fake hub, which has the referrers API
(`docker.io`), and a fake hub in front of a real docker-registry 2.8, which has none and
keeps the tag-schema indexes this module pushes into it (`plain.example`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, UpstreamConfig
from mirror.upstream import client as upstream_client
from tests import images
from tests.conftest import MakeClient
from tests.fakehub import OCI_INDEX, OCI_MANIFEST, FakeHub
from tests.services import DistributionRegistry

Client = TestClient[Any, Any]
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
PLAIN = "plain.example"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real docker-registry (no referrers API) holding a signed and an unsigned image."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (make test installs it)")
    with DistributionRegistry(tmp_path_factory.mktemp("referrers-registry")) as reg:
        signed, plain = images.busybox_image(), images.many_layers_image(2)
        images.push_image(reg.url, "library/signed", "latest", signed)
        images.push_image(reg.url, "library/plain", "latest", plain)
        index, artifacts = images.push_referrers(
            reg.url, "library/signed", signed.manifest, [(SIGNATURE, b"sig"), (SBOM, b"{}")]
        )
        yield {
            "url": reg.url,
            "subject": signed.manifest.digest,
            "unsigned": plain.manifest.digest,
            "index": index,
            "artifacts": {SIGNATURE: artifacts[0].digest, SBOM: artifacts[1].digest},
        }


@pytest.fixture
async def plain_hub(registry: dict[str, Any]) -> AsyncIterator[FakeHub]:
    """A Docker-Hub-like front for the registry: no referrers API either."""
    async with FakeHub(backend=registry["url"]) as fake:
        yield fake


@pytest.fixture
def api_content(hub: FakeHub) -> dict[str, Any]:
    """The same kind of content on the hub with the referrers API."""
    signed = hub.content.add_image("library/signed", "latest", [b"signed layer"])
    unsigned = hub.content.add_image("library/plain", "latest", [b"plain layer"])
    subject = signed["digest"]
    artifacts = {
        kind: hub.content.add_artifact("library/signed", subject, kind, payload)
        for kind, payload in ((SIGNATURE, b"sig"), (SBOM, b"{}"))
    }
    return {"subject": subject, "unsigned": unsigned["digest"], "artifacts": artifacts}


@pytest.fixture
def mirror_factory(make_client: MakeClient, plain_hub: FakeHub) -> MakeClient:
    async def make(**changes: Any) -> Client:
        upstreams = (UpstreamConfig(url=plain_hub.registry_url, name=PLAIN),)
        return await make_client(upstreams=upstreams, **changes)

    return make


@pytest.fixture
async def mirror(mirror_factory: MakeClient) -> Client:
    return await mirror_factory()


def content_for(kind: str, api: dict[str, Any], plain: dict[str, Any]) -> tuple[str, dict]:
    """The path prefix routing to the upstream of this kind, and its content."""
    return ("", api) if kind == "api" else (f"{PLAIN}/", plain)


async def referrers(client: Client, prefix: str, digest: str, query: str = "") -> Any:
    return await client.get(f"/v2/{prefix}library/signed/referrers/{digest}{query}")


def by_type(artifact_type: str) -> str:
    """The query a client sends (`+` escaped, as Go's url.Values does)."""
    return "?" + urlencode({"artifactType": artifact_type})


def listed(body: bytes) -> dict[str, str]:
    index = json.loads(body)
    assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2
    return {m["artifactType"]: m["digest"] for m in index["manifests"]}


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_referrers_answered_with_an_index(
    hub: FakeHub,
    plain_hub: FakeHub,
    mirror: Client,
    api_content: dict[str, Any],
    registry: dict[str, Any],
    kind: str,
) -> None:
    prefix, content = content_for(kind, api_content, registry)

    resp = await referrers(mirror, prefix, content["subject"])

    assert resp.status == 200
    assert resp.content_type == OCI_INDEX
    assert listed(await resp.read()) == content["artifacts"]
    assert "OCI-Filters-Applied" not in resp.headers
    if kind == "tag-schema":  # asked the API once (404), then read the tag
        assert plain_hub.stats["referrers"] == 1
        if_tag = f"/v2/library/signed/manifests/{registry['subject'].replace(':', '-')}"
        assert any(path == if_tag for _, _, path in plain_hub.stats.requests)
        assert await resp.read() == registry["index"].data
    else:
        assert hub.stats["referrers"] == 1


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_nothing_refers_is_an_empty_index(
    mirror: Client, api_content: dict[str, Any], registry: dict[str, Any], kind: str
) -> None:
    prefix, content = content_for(kind, api_content, registry)
    path = f"/v2/{prefix}library/plain/referrers/{content['unsigned']}"

    resp = await mirror.get(path)

    assert resp.status == 200
    assert resp.content_type == OCI_INDEX
    assert listed(await resp.read()) == {}


@pytest.mark.parametrize("kind", ["api", "api-without-filter", "tag-schema"])
async def test_artifact_type_filter_applied_and_said(
    hub: FakeHub, mirror: Client, api_content: dict[str, Any], registry: dict[str, Any], kind: str
) -> None:
    hub.referrers_filter = kind != "api-without-filter"
    prefix, content = content_for(kind.removesuffix("-without-filter"), api_content, registry)

    resp = await referrers(mirror, prefix, content["subject"], by_type(SIGNATURE))

    assert resp.status == 200
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert listed(await resp.read()) == {SIGNATURE: content["artifacts"][SIGNATURE]}


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_referrers_cached_like_tags(
    hub: FakeHub,
    plain_hub: FakeHub,
    mirror: Client,
    api_content: dict[str, Any],
    registry: dict[str, Any],
    kind: str,
) -> None:
    prefix, content = content_for(kind, api_content, registry)
    first = await (await referrers(mirror, prefix, content["subject"])).read()
    upstream = hub if kind == "api" else plain_hub
    upstream.reset_stats()

    again = await referrers(mirror, prefix, content["subject"])
    filtered = await referrers(mirror, prefix, content["subject"], by_type(SBOM))

    assert await again.read() == first
    assert listed(await filtered.read()) == {SBOM: content["artifacts"][SBOM]}
    assert upstream.stats.requests == []  # within the tag TTL: no upstream request at all
    assert 0 < int(again.headers["Cache-Control"].removeprefix("max-age=")) <= 600


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_referrers_and_artifacts_served_stale_through_an_outage(
    hub: FakeHub,
    plain_hub: FakeHub,
    mirror_factory: MakeClient,
    api_content: dict[str, Any],
    registry: dict[str, Any],
    kind: str,
) -> None:
    mirror = await mirror_factory(cache=CacheConfig(tag_ttl=0))
    prefix, content = content_for(kind, api_content, registry)
    before = await (await referrers(mirror, prefix, content["subject"])).read()
    signature = content["artifacts"][SIGNATURE]
    sig_url = f"/v2/{prefix}library/signed/manifests/{signature}"
    assert (await mirror.get(sig_url, headers={"Accept": OCI_MANIFEST})).status == 200
    (hub if kind == "api" else plain_hub).registry_status = 503

    during = await referrers(mirror, prefix, content["subject"])
    sig = await mirror.get(sig_url, headers={"Accept": OCI_MANIFEST})

    assert during.status == 200
    assert during.headers["Warning"].startswith("110")
    assert during.headers["Cache-Control"] == "max-age=0"
    assert await during.read() == before
    assert sig.status == 200
    assert sig.headers["Docker-Content-Digest"] == signature


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_unknown_repository_is_name_unknown(
    mirror: Client, api_content: dict[str, Any], registry: dict[str, Any], kind: str
) -> None:
    prefix, content = content_for(kind, api_content, registry)

    resp = await mirror.get(f"/v2/{prefix}library/nowhere/referrers/{content['subject']}")

    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize("kind", ["api", "tag-schema"])
async def test_invalid_digest_is_400_digest_invalid(mirror: Client, kind: str) -> None:
    prefix = "" if kind == "api" else f"{PLAIN}/"

    resp = await mirror.get(f"/v2/{prefix}library/signed/referrers/sha256:nothex")

    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"


async def test_set_index_relayed_as_the_upstream_sent_it(hub: FakeHub, mirror: Client) -> None:
    image = hub.content.add_image("library/signed", "latest", [b"layer"])
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": "sha256:" + "5" * 64,
                    "size": 123,
                    "artifactType": "application/vnd.dev.sigstore.bundle+json",
                }
            ],
        }
    ).encode()
    hub.content.set_referrers(image["digest"], index)

    resp = await referrers(mirror, "", image["digest"])

    assert resp.status == 200
    assert await resp.read() == index


def test_storage_keeps_no_path_from_the_tag_key(tmp_path: Path) -> None:
    """The key a referrers answer is kept under can never be a real tag."""
    from mirror.cache.referrers import referrers_key
    from mirror.oci.reference import TAG_RE, parse_digest

    key = referrers_key(parse_digest("sha256:" + "a" * 64))

    assert TAG_RE.fullmatch(key) is None
    assert ":" not in key and "/" not in key


async def test_paged_api_answer_is_merged_into_one_index(
    hub: FakeHub, mirror: Client, api_content: dict[str, Any]
) -> None:
    hub.referrers_page_size = 1

    resp = await referrers(mirror, "", api_content["subject"])

    assert resp.status == 200
    assert "Link" not in resp.headers
    assert listed(await resp.read()) == api_content["artifacts"]
    assert hub.stats["referrers"] == 2


# --- an upstream whose answers are malformed -------------------------------------------------

SUBJECT = "sha256:" + "c" * 64
EMPTY = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def hostile_client(
    aiohttp_server: Any, make_client: MakeClient, answer: Callable[[web.Request], web.Response]
) -> tuple[Client, list[str]]:
    """A mirror in front of an upstream whose every answer `answer` makes; the paths asked."""
    asked: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        asked.append(f"{request.method} {request.path}")
        return answer(request)

    app = web.Application()
    app.router.add_route("*", "/v2/{rest:.*}", any_path)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    return await make_client(upstream=UpstreamConfig(url=url)), asked


async def test_a_link_that_is_no_url_is_502(aiohttp_server: Any, make_client: MakeClient) -> None:
    def broken(request: web.Request) -> web.Response:
        return web.json_response(EMPTY, headers={"Link": '<http://[::1/x>; rel="next"'})

    client, _ = await hostile_client(aiohttp_server, make_client, broken)

    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_an_index_nested_past_the_parsers_depth_is_502(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def nested(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000, content_type=OCI_INDEX)

    client, _ = await hostile_client(aiohttp_server, make_client, nested)

    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_an_error_body_nested_past_the_parsers_depth_is_no_error_code(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """A 404 whose body is no OCI error: no referrers API, no tag-schema index, and no
    word that the repository is unknown: nothing refers to the subject."""

    def nested(request: web.Request) -> web.Response:
        # Within the 64 KiB an error body is read to: still far past the parser's depth.
        return web.Response(status=404, body=b"[" * 60_000, content_type="application/json")

    client, asked = await hostile_client(aiohttp_server, make_client, nested)

    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")

    assert resp.status == 200
    assert json.loads(await resp.read()) == EMPTY
    assert asked[-1] == "GET /v2/team/app/tags/list"


@pytest.mark.parametrize(
    ("status", "body", "scope"),
    [
        (404, {"errors": [{"code": "NOT_FOUND", "message": "no such subject"}]}, "repository"),
        (400, {"errors": [{"code": "DIGEST_INVALID", "message": "bad digest"}]}, "repository"),
        (404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}, "subject"),
        (400, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}, "subject"),
        (404, None, "upstream"),  # no OCI error: the route itself is unknown
        (405, None, "upstream"),
        (501, {"errors": [{"code": "UNSUPPORTED", "message": "no referrers"}]}, "upstream"),
    ],
)
async def test_only_an_answer_about_the_endpoint_means_no_api_for_every_repository(
    aiohttp_server: Any, make_client: MakeClient, status: int, body: Any, scope: str
) -> None:
    """Repository a's referrers answer `status`; repository b's API answers an index. An
    answer that may be about a's repository or subject leaves b's API asked; a's is asked
    again for another subject only after an answer about the subject."""
    signature = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": 2,
                 "artifactType": SIGNATURE}  # fmt: skip

    def answer(request: web.Request) -> web.Response:
        if request.path.startswith("/v2/team/b/referrers/"):
            return web.json_response({**EMPTY, "manifests": [signature]})
        if request.path.startswith("/v2/team/a/referrers/"):
            if body is None:
                return web.Response(status=status, text="404 page not found")
            return web.json_response(body, status=status)
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)

    client, asked = await hostile_client(aiohttp_server, make_client, answer)

    a = await client.get(f"/v2/team/a/referrers/{SUBJECT}")
    b = await client.get(f"/v2/team/b/referrers/{SUBJECT}")

    whole = scope == "upstream"
    assert a.status == b.status == 200
    assert listed(await a.read()) == {}
    assert listed(await b.read()) == ({} if whole else {SIGNATURE: signature["digest"]})
    assert (f"GET /v2/team/b/referrers/{SUBJECT}" in asked) is not whole
    other = "sha256:" + "e" * 64
    assert (await client.get(f"/v2/team/a/referrers/{other}")).status == 200
    assert (f"GET /v2/team/a/referrers/{other}" in asked) is (scope == "subject")


async def test_an_unknown_subject_leaves_the_api_asked_for_signed_ones(
    hub: FakeHub, make_client: MakeClient
) -> None:
    """Quay answers 400 MANIFEST_UNKNOWN for the referrers of a subject it does not know:
    that subject has none, and an image signed after it still has its signature found
    through the API (it was reported as having none for an hour)."""
    answer_of = hub.content.referrers_index

    def quay_like(repo: str, subject: str) -> dict[str, Any]:
        if subject not in hub.content.manifests.get(repo, {}):
            error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            raise web.HTTPBadRequest(text=json.dumps(error), content_type="application/json")
        return answer_of(repo, subject)

    hub.content.referrers_index = quay_like  # type: ignore[method-assign]
    hub.content.add_image("org/app", "v1", [b"unsigned"])
    client = await make_client()
    unknown = await client.get(f"/v2/org/app/referrers/sha256:{'0' * 64}")
    assert unknown.status == 200
    assert listed(await unknown.read()) == {}

    image = hub.content.add_image("org/app", "v2", [b"signed later"])
    signature = hub.content.add_artifact("org/app", image["digest"], SIGNATURE, b"sig")
    hub.reset_stats()
    signed = await client.get(f"/v2/org/app/referrers/{image['digest']}")

    assert signed.status == 200
    assert listed(await signed.read()) == {SIGNATURE: signature}
    assert hub.stats["referrers"] == 1


# --- an upstream that would make the mirror hold too much ------------------------------------


def descriptor(number: int, artifact_type: str = SIGNATURE) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": f"sha256:{number:064x}", "size": number,
            "artifactType": artifact_type}  # fmt: skip


def paged(pages: list[bytes]) -> Callable[[web.Request], web.Response]:
    """An upstream answering `pages` one after the other, each linking to the next."""

    def answer(request: web.Request) -> web.Response:
        number = int(request.query.get("page", "0"))
        headers = {"Content-Type": OCI_INDEX}
        if number + 1 < len(pages):
            headers["Link"] = f'<{request.path}?page={number + 1}>; rel="next"'
        return web.Response(body=pages[number], headers=headers)

    return answer


async def test_pages_past_the_index_limit_together_are_502(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """Three pages of 1.5 MB of descriptors, each well within 4 MiB: together, past it."""
    page = json.dumps({**EMPTY, "manifests": [descriptor(n) for n in range(6_500)]}).encode()
    assert 1_400_000 < len(page) < 2_000_000
    client, asked = await hostile_client(aiohttp_server, make_client, paged([page] * 3))

    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")
    body = await resp.read()

    assert len(body) < 4 * 1024 * 1024
    assert resp.status == 502
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"
    assert len(asked) == 3  # the third page's read stopped at what was left of the bound


async def test_pages_within_the_index_limit_together_are_merged(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    page = json.dumps({**EMPTY, "manifests": [descriptor(n) for n in range(6_500)]}).encode()
    client, _ = await hostile_client(aiohttp_server, make_client, paged([page] * 2))

    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")

    assert resp.status == 200
    assert len(json.loads(await resp.read())["manifests"]) == 13_000


async def test_entries_that_are_no_descriptors_are_left_out(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    good = [descriptor(1), descriptor(2, SBOM), {**descriptor(3), "annotations": {"a": "b"}}]
    bad = [
        {},
        "sha256:" + "1" * 64,
        None,
        [descriptor(4)],
        {**descriptor(5), "size": -1},
        {**descriptor(6), "size": True},
        {**descriptor(7), "size": "7"},
        {**descriptor(8), "digest": "sha256:short"},
        {**descriptor(9), "mediaType": "no media type"},
        {key: value for key, value in descriptor(10).items() if key != "mediaType"},
    ]
    index = json.dumps({**EMPTY, "manifests": [bad[0], good[0], *bad[1:], *good[1:]]})
    client, _ = await hostile_client(
        aiohttp_server, make_client, lambda _: web.Response(body=index, content_type=OCI_INDEX)
    )

    whole = await client.get(f"/v2/team/app/referrers/{SUBJECT}")
    signatures = await client.get(f"/v2/team/app/referrers/{SUBJECT}{by_type(SIGNATURE)}")

    assert whole.status == signatures.status == 200
    assert json.loads(await whole.read())["manifests"] == good
    assert json.loads(await signatures.read())["manifests"] == [good[0], good[2]]
    assert json.loads(await signatures.read())["mediaType"] == OCI_INDEX


async def test_a_kept_index_is_parsed_once_off_the_loop_for_filtering(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mirror.cache import referrers as module

    parsed_in: list[str] = []
    merge = module.merge_pages

    def counted(pages: list[bytes]) -> Any:
        parsed_in.append(threading.current_thread().name)
        return merge(pages)

    monkeypatch.setattr(module, "merge_pages", counted)
    index = json.dumps({**EMPTY, "manifests": [descriptor(1), descriptor(2, SBOM)]})
    client, _ = await hostile_client(
        aiohttp_server, make_client, lambda _: web.Response(body=index, content_type=OCI_INDEX)
    )

    for kind in (SIGNATURE, SBOM, "application/other", SIGNATURE):
        resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}{by_type(kind)}")
        assert resp.status == 200

    assert len(parsed_in) == 1  # on fetching; every filter after it used the split form
    assert threading.main_thread().name not in parsed_in


async def test_slow_pages_end_at_the_paging_deadline_with_the_kept_index(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages each well within their own deadline (0.2 + 2 × 0.4 s), endless: the fetch is
    given up after two exchanges' worth as an upstream failure, and the kept index served
    stale. Without the deadline: 20 pages of 0.2 s, then a 502."""
    monkeypatch.setattr(upstream_client, "PAGED_EXCHANGES", 2)
    index = {**EMPTY, "manifests": [descriptor(1)]}
    slow = False

    async def answer(request: web.Request) -> web.Response:
        if not slow:
            return web.json_response(index)
        await asyncio.sleep(0.2)
        link = f'<{request.path}?page={int(request.query.get("page", "0")) + 1}>; rel="next"'
        return web.json_response(index, headers={"Link": link})

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/referrers/{digest}", answer)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    upstream = UpstreamConfig(url=url, connect_timeout=0.2, read_timeout=0.4)
    client = await make_client(upstream=upstream, cache=CacheConfig(tag_ttl=0))
    before = await (await client.get(f"/v2/team/app/referrers/{SUBJECT}")).read()
    slow = True

    started = time.monotonic()
    resp = await client.get(f"/v2/team/app/referrers/{SUBJECT}")

    assert time.monotonic() - started < 2 * (0.2 + 2 * 0.4) + 1.5
    assert resp.status == 200
    assert resp.headers["Warning"].startswith("110")
    assert await resp.read() == before
