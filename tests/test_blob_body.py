"""Blob bodies from an upstream: where their bytes start, and a blob of no announced size."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirror.config import Config, UpstreamConfig
from mirror.upstream.body import BlobBody, parse_content_range
from mirror.web.app import create_app
from tests.test_blobs import wait_cached


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-99/100", (0, 100)),
        ("bytes 42-99/100", (42, 100)),
        ("bytes 42-99/*", (42, None)),
        ("bytes 42-99", (42, None)),
        ("bytes */100", None),
        ("items 0-9/10", None),
        ("", None),
        ("bytes \u00b2-99/100", None),  # str.isdigit() says yes; int() says no
        ("bytes 42-99/\u00b2", (42, None)),
        (f"bytes {'9' * 5000}-99/100", None),  # past int()'s digit limit
    ],
)
def test_content_range(value: str, parsed: tuple[int, int | None] | None) -> None:
    assert parse_content_range(value) == parsed


class _Reading(asyncio.Protocol):
    """What a StreamReader pauses and resumes: nothing to do here."""

    def pause_reading(self, **_: object) -> None: ...

    def resume_reading(self, **_: object) -> None: ...


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_is_handed_out_in_the_pieces_received(chunked: bool) -> None:
    """Pieces buffered while the loop was busy come out as they are, not joined into a
    new bytes (a copy of every byte of a layer); HTTP chunk boundaries end nothing."""
    reader = aiohttp.StreamReader(_Reading(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    pieces = [os.urandom(1000), os.urandom(3000), os.urandom(10)]
    for piece in pieces:
        if chunked:
            reader.begin_http_chunk_receiving()
        reader.feed_data(piece)
        if chunked:
            reader.end_http_chunk_receiving()
    reader.feed_eof()

    # aiohttp's response, as far as a body reads it: its length and its stream.
    response = SimpleNamespace(content=reader, content_length=None)
    body = BlobBody(response, 0, None)  # type: ignore[arg-type]

    got = [piece async for piece in body.chunks()]

    assert len(got) == 3 and all(a is b for a, b in zip(got, pieces, strict=True))


async def test_blob_without_length_reaches_the_client_whole(
    aiohttp_server: Any, aiohttp_client: Any, config: Config
) -> None:
    """An upstream that sends a blob chunked (no Content-Length): the mirror's answer is
    chunked too, so its body is copied through the writer, not sent by sendfile."""
    layer = os.urandom(3 * 1024 * 1024 + 17)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)  # no length: chunked
        for offset in range(0, len(layer), 256 * 1024):
            await resp.write(layer[offset : offset + 256 * 1024])
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(upstream)
    url = f"http://127.0.0.1:{server.port}"
    mirror = await aiohttp_client(create_app(replace(config, upstream=UpstreamConfig(url=url))))
    for _ in ("cold", "warm"):
        async with asyncio.timeout(10):  # a chunked answer sent by sendfile never ends
            resp = await mirror.get(f"/v2/library/app/blobs/{digest}")
            assert resp.status == 200
            assert await resp.read() == layer
        assert (await wait_cached(config, digest)).exists()
