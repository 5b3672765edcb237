"""A fault of the mirror's own (an exception no code maps) answered as a registry would.

Docker, containerd and podman show a registry's OCI error body; aiohttp's own 500 is an
HTML-ish text page that they print as "unexpected end of JSON" or worse, without the
request id an operator needs to find the traceback. The handlers here are the test's own,
added to the app `create_app` built, so that nothing of the mirror's is replaced.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirror.config import Config
from mirror.observe.logs import REQUEST_ID_HEADER
from mirror.web.app import create_app
from mirror.web.stamp import prepare

SECRET = "s3cr3t-token-in-an-exception"


async def fails(request: web.Request) -> web.StreamResponse:
    raise RuntimeError(f"a bug that quotes {SECRET}")


async def fails_mid_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 1024
    await prepare(request, response)
    await response.write(b"x" * 100)
    raise RuntimeError("a bug after the head went out")


@pytest.fixture
async def client(aiohttp_client: Any, config: Config) -> Any:
    app = create_app(config)
    app.router.add_get("/v2/_test/fails", fails)
    app.router.add_get("/v2/_test/fails-mid-body", fails_mid_body)
    return await aiohttp_client(app)


async def test_a_fault_is_an_oci_500_with_the_request_id(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        resp = await client.get("/v2/_test/fails")
        body = await resp.read()
    assert resp.status == 500
    assert resp.headers["Content-Type"] == "application/json"
    errors = json.loads(body)["errors"]
    assert [error["code"] for error in errors] == ["UNKNOWN"]
    assert SECRET.encode() not in body  # the exception's text stays in the log
    assert resp.headers[REQUEST_ID_HEADER]  # what the log line is stamped with
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    logged = [r for r in caplog.records if r.exc_info and r.name == "mirror.web.middleware"]
    assert len(logged) == 1 and "GET /v2/_test/fails" in logged[0].getMessage()

    head = await client.head("/v2/_test/fails")
    assert head.status == 500 and head.headers["Content-Length"] == str(len(body))

    metrics = await (await client.get("/metrics")).text()
    assert 'status="500"' in metrics


async def test_a_fault_after_the_head_cuts_the_connection(client: Any) -> None:
    """No second head after the first: the client sees a short body, as on a cut link."""
    resp = await client.get("/v2/_test/fails-mid-body", timeout=aiohttp.ClientTimeout(total=10))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
