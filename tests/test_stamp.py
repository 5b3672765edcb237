"""Every answer carries its request id, and every registry API answer the API version and
`nosniff`, whichever way it went out: returned by a handler, streamed by one, or an error."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fakehub import FakeHub

Client = TestClient[Any, Any]
LAYER = b"stamped layer " * 4096


@pytest.fixture
async def image(hub: FakeHub) -> dict[str, Any]:
    return hub.content.add_image("library/stamped", "latest", [LAYER])


def blob_path(image: dict[str, Any]) -> str:
    return f"/v2/library/stamped/blobs/{image['layers'][0]}"


async def answers(client: Client, image: dict[str, Any]) -> list[tuple[str, Any]]:
    """One of each kind of answer, in the order that makes each kind happen."""
    manifest = "/v2/library/stamped/manifests/latest"
    blob = blob_path(image)
    asked = [
        ("GET", "/v2/", {}),
        ("GET", manifest, {}),  # a miss, fetched
        ("HEAD", manifest, {}),
        ("GET", manifest, {}),  # a hit
        ("GET", "/v2/library/stamped/manifests/nosuchtag", {}),  # the upstream's 404
        ("GET", "/v2/no/such/endpoint", {}),  # ours
        ("DELETE", manifest, {}),
        ("GET", blob, {}),  # streamed while it downloads
        ("GET", blob, {}),  # from the cache, by sendfile
        ("GET", blob, {"Range": "bytes=0-99"}),
        ("HEAD", blob, {}),
        ("GET", blob, {"If-None-Match": f'"{image["layers"][0]}"'}),
        ("GET", "/v2/library/stamped/tags/list", {}),
        ("GET", "/healthz", {}),
    ]
    seen = []
    for method, path, headers in asked:
        resp = await client.request(method, path, headers=headers)
        await resp.read()
        seen.append((f"{method} {path} {headers} -> {resp.status}", resp))
    return seen


async def test_every_answer_is_stamped(client: Client, image: dict[str, Any]) -> None:
    seen = await answers(client, image)
    statuses = [resp.status for _, resp in seen]
    assert statuses == [200, 200, 200, 200, 404, 404, 405, 200, 200, 206, 200, 304, 200, 200]
    ids = set()
    for what, resp in seen:
        ids.add(resp.headers.get("X-Request-ID"))
        if " /v2" in what:
            assert resp.headers.get("Docker-Distribution-API-Version") == "registry/2.0", what
            assert resp.headers.get("X-Content-Type-Options") == "nosniff", what
        else:
            assert "Docker-Distribution-API-Version" not in resp.headers, what
    assert None not in ids and len(ids) == len(seen)  # one id each


async def test_a_request_id_sent_is_the_one_answered(client: Client) -> None:
    resp = await client.get("/v2/", headers={"X-Request-ID": "trace-42"})
    assert resp.headers["X-Request-ID"] == "trace-42"
