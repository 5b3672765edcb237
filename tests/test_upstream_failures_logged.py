"""Every upstream failure a client sees is one WARNING naming the upstream, the repository
and the cause; an outage is rate-limited to one line per upstream and cause."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.observe.logs import FailureLog
from mirror.oci.errors import UpstreamUnavailable
from tests.conftest import MakeClient
from tests.fakehub import FakeHub

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mirror.upstream" and r.levelno == logging.WARNING
    ]


async def test_a_manifest_the_upstream_cannot_serve_is_a_warning(
    hub: FakeHub, client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    hub.content.add_image("library/app", "1", [b"x"])
    hub.registry_status = 500
    caplog.set_level(logging.WARNING, logger="mirror.upstream")

    resp = await client.get("/v2/library/app/manifests/1", headers=ACCEPT)

    assert resp.status == 503
    upstream = hub.registry_url.removeprefix("http://")
    (line,) = warnings(caplog)
    assert line.startswith(f"upstream {upstream} failed for library/app: ")
    assert "answered 500" in line


async def test_a_rate_limited_upstream_is_a_warning(
    hub: FakeHub, client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    hub.content.add_image("library/app", "1", [b"x"])
    hub.registry_status = 429
    caplog.set_level(logging.WARNING, logger="mirror.upstream")

    assert (await client.get("/v2/library/app/manifests/1", headers=ACCEPT)).status == 429

    (line,) = warnings(caplog)
    assert "library/app" in line and "rate limit" in line


async def test_an_outage_is_one_line_per_interval(
    hub: FakeHub, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    hub.registry_status = 503
    caplog.set_level(logging.WARNING, logger="mirror.upstream")

    for n in range(20):
        resp = await client.get(f"/v2/library/app{n}/manifests/1", headers=ACCEPT)
        assert resp.status == 503

    assert len(warnings(caplog)) == 1


async def test_a_missing_manifest_is_no_warning(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mirror.upstream")
    resp = await client.get("/v2/library/nope/manifests/1", headers=ACCEPT)
    assert resp.status == 404
    assert warnings(caplog) == []


def test_held_back_lines_are_counted_and_one_error_is_logged_once() -> None:
    now = [0.0]
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.failures")
    logger.addHandler(Catch())
    logger.propagate = False
    failures = FailureLog(logger, interval=10, clock=lambda: now[0], wall=lambda: 1e9 + now[0])
    shared = UpstreamUnavailable("down")
    for _ in range(3):  # three clients of one download, one error
        failures.warn("hub", "library/a", shared, shared.message)
    for n in range(4):
        now[0] = 1.0 + n
        failures.warn("hub", f"library/b{n}", UpstreamUnavailable("down"), "down")
    now[0] = 300.0  # minutes later: the count says when its burst began, not "lately"
    failures.warn("hub", "library/c", UpstreamUnavailable("down"), "down\n forged")

    began = time.strftime("%H:%M:%S", time.localtime(1e9 + 1.0))
    assert records == [
        "upstream hub failed for library/a: down",
        f"upstream hub failed for library/c: down\\n forged (4 more like it since {began})",
    ]


async def test_a_blob_download_that_fails_upstream_is_one_warning_for_all_its_clients(
    hub: FakeHub, client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    digest = hub.content.add_blob(b"a layer nobody gets" * 1000)
    hub.registry_status = 500
    caplog.set_level(logging.WARNING)

    answers = await asyncio.gather(
        *(client.get(f"/v2/library/app/blobs/{digest}") for _ in range(3))
    )

    assert [resp.status for resp in answers] == [503] * 3
    upstream = hub.registry_url.removeprefix("http://")
    (line,) = warnings(caplog)
    assert line.startswith(f"upstream {upstream} failed for library/app: ")
    assert not [r for r in caplog.records if "download failed" in r.getMessage()]
