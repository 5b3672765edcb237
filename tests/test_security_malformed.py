"""Malformed values from an upstream are its error, never the mirror's: each one here
raised a Python exception the error middleware does not map (a bare 500 and a traceback
per request); now each is read as absent, or answered with the OCI error the rest of the
upstream's bad answers get.

The upstream is the hostile registry of test_security_poison.py: each test sets what it
answers for a manifest.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.config import UpstreamConfig
from mirror.oci.negotiation import DOCKER_LIST, DOCKER_MANIFEST
from mirror.web.keys import metrics_key
from tests.conftest import MakeClient
from tests.test_security_poison import Hostile, digest_of, name_of

Client = TestClient[Any, Any]
SCHEMA2 = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []}).encode()
SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes; int() says no


@pytest.fixture
async def hostile(aiohttp_server: Any) -> Hostile:
    registry = Hostile()
    registry.url = str((await aiohttp_server(registry.app())).make_url("")).rstrip("/")
    return registry


@pytest.fixture
async def mirror(make_client: MakeClient, hostile: Hostile) -> Client:
    return await make_client(upstream=UpstreamConfig(url=hostile.url, read_timeout=5))


def gauge(client: Client, name: str, hostile: Hostile) -> float | None:
    return client.app[metrics_key].registry.get_sample_value(name, {"upstream": name_of(hostile)})


def answer(body: bytes, content_type: str, **headers: str) -> Any:
    async def send(request: web.Request) -> web.Response:
        sent = {"Content-Type": content_type, "Docker-Content-Digest": digest_of(body)}
        return web.Response(body=body, headers={**sent, **headers})

    return send


async def test_a_ratelimit_header_of_no_ascii_number_is_not_read(
    mirror: Client, hostile: Hostile
) -> None:
    headers = {"ratelimit-remaining": SUPERSCRIPT_TWO, "ratelimit-limit": "100;w=21600"}
    hostile.manifests["v1"] = answer(SCHEMA2, DOCKER_MANIFEST, **headers)

    resp = await mirror.get("/v2/library/app/manifests/v1")

    assert resp.status == 200
    assert gauge(mirror, "mirror_upstream_ratelimit_limit", hostile) == 100
    assert gauge(mirror, "mirror_upstream_ratelimit_remaining", hostile) is None


async def test_a_retry_after_of_no_ascii_number_is_a_minute(
    mirror: Client, hostile: Hostile
) -> None:
    async def limited(request: web.Request) -> web.Response:
        body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}
        return web.json_response(body, status=429, headers={"Retry-After": SUPERSCRIPT_TWO})

    hostile.manifests["v1"] = limited

    resp = await mirror.get("/v2/library/app/manifests/v1")

    assert resp.status == 429
    assert resp.headers["Retry-After"] == "60"
    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_a_list_entry_whose_platform_is_no_object_is_passed_over(
    mirror: Client, hostile: Hostile
) -> None:
    amd64 = digest_of(SCHEMA2)
    entries = [
        {"mediaType": DOCKER_MANIFEST, "digest": "sha256:" + "b" * 64, "platform": "linux"},
        {"mediaType": DOCKER_MANIFEST, "digest": amd64,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]  # fmt: skip
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries})
    hostile.manifests["v1"] = answer(body.encode(), DOCKER_LIST)
    hostile.manifests[amd64] = answer(SCHEMA2, DOCKER_MANIFEST)

    resp = await mirror.get("/v2/library/app/manifests/v1", headers={"Accept": DOCKER_MANIFEST})

    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == amd64


async def test_a_manifest_nested_past_the_parsers_depth_is_502(
    mirror: Client, hostile: Hostile
) -> None:
    """Served as no manifest type, so its `mediaType` is looked for in the body."""
    body = b'{"mediaType": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    hostile.manifests["v1"] = answer(body, "application/json")

    resp = await mirror.get("/v2/library/app/manifests/v1")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_a_redirect_to_no_url_is_refused_as_misdirected(
    mirror: Client, hostile: Hostile
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "http://[::1/v2/elsewhere"})

    hostile.manifests["v1"] = broken

    resp = await mirror.get("/v2/library/app/manifests/v1")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert gauge(mirror, "mirror_upstream_redirects_refused_total", hostile) == 1
