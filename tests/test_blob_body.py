"""Blob bodies from an upstream: where their bytes start, how many there are, and a blob of
no announced size."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from mirror.cache.downloads import Download
from mirror.config import Config, UpstreamConfig
from mirror.oci.reference import parse_digest
from mirror.upstream.body import BlobBody, parse_content_range
from mirror.web.app import create_app
from mirror.web.keys import metrics_key
from tests.test_blobs import blob_file, wait_cached


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-99/100", (0, 99, 100)),
        ("bytes 42-99/100", (42, 99, 100)),
        ("bytes 42-99/*", (42, 99, None)),
        ("bytes 42-99", (42, 99, None)),
        ("bytes 42-*/*", (42, None, None)),  # a replica's answer while the size is unknown
        ("bytes */100", None),
        ("items 0-9/10", None),
        ("", None),
        ("bytes \u00b2-99/100", None),  # str.isdigit() says yes; int() says no
        ("bytes 42-99/\u00b2", (42, 99, None)),
        ("bytes 42-\u00b2/100", (42, None, 100)),
        (f"bytes {'9' * 5000}-99/100", None),  # past int()'s digit limit
    ],
)
def test_content_range(value: str, parsed: tuple[int, int | None, int | None] | None) -> None:
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
    response = SimpleNamespace(content=reader, content_length=None, url=URL("http://hub"))
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


# --- how long a body is: a 206 answers the range asked, and no body runs past its length ---


def _partial(span: str, length: int | None = None) -> Any:
    """A 206 as `BlobBody.of` reads one: its Content-Range, and Content-Length if sent."""
    headers = {"Content-Range": span}
    return SimpleNamespace(status=206, headers=headers, content_length=length)


@pytest.mark.parametrize(
    ("span", "length", "asked", "read"),
    [
        ("bytes 0-99/100", None, None, None),  # no Range was sent: a 206 answers none
        ("bytes 0-99/100", None, 0, (0, 100, 100)),
        ("bytes 10-99/100", None, 0, None),  # not from the byte asked
        ("bytes 10-99/100", 90, 10, (10, 90, 100)),
        ("bytes 10-99/100", 4096, 10, None),  # its Content-Length says otherwise
        ("bytes 10-100/100", None, 10, None),  # past the blob's end
        ("bytes 10-5/100", None, 10, None),
        ("bytes 100-99/100", 0, 100, (100, 0, 100)),  # asked from the very end
        ("bytes 10-*/*", None, 10, (10, None, None)),  # a replica's, its size not known yet
        ("bytes 10-*/5", None, 10, None),
    ],
)
def test_a_partial_body_must_be_the_part_asked(
    span: str, length: int | None, asked: int | None, read: tuple[int, int, int] | None
) -> None:
    body = BlobBody.of(_partial(span, length), asked=asked)
    assert (body and (body.offset, body.length, body.total)) == read


def _upstream_bytes(mirror: Any) -> float:
    """Blob bytes the mirror took from upstreams (each written to its disk)."""
    family = mirror.app[metrics_key].upstream_bytes.collect()[0]
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


async def _raw_get(mirror: Any, path: str) -> tuple[bytes, bytes]:
    """A keep-alive GET on a bare socket: its head, and every byte that follows on the
    connection until the mirror closes it (or a quiet second)."""
    reader, writer = await asyncio.open_connection(mirror.host, mirror.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror.test\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    rest = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 1):
            rest += chunk
    except TimeoutError:
        pass
    writer.close()
    return head, rest


async def test_a_206_to_a_request_without_range_is_refused(
    aiohttp_server: Any, aiohttp_client: Any, config: Config
) -> None:
    """An upstream answering a plain GET with `206 bytes 0-99/100` and then megabytes: the
    mirror took the 100 for the blob's size, wrote every byte to tmp/ past its max_size,
    and gave the client 100 wrong bytes as a whole, immutable blob."""
    real = b"a" * 100
    digest = "sha256:" + hashlib.sha256(real).hexdigest()

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers={"Content-Range": "bytes 0-99/100"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b"b" * (256 * 1024))
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(upstream)
    storage = replace(config.storage, max_size=1024 * 1024)
    url = f"http://127.0.0.1:{server.port}"
    mirror = await aiohttp_client(
        create_app(replace(config, upstream=UpstreamConfig(url=url), storage=storage))
    )

    resp = await mirror.get(f"/v2/library/app/blobs/{digest}")

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert _upstream_bytes(mirror) == 0
    assert not blob_file(config, digest).exists()


@pytest.mark.parametrize("said", ["range", "nothing"])
async def test_a_resumed_body_longer_than_its_range_is_cut_at_the_blobs_size(
    aiohttp_server: Any, aiohttp_client: Any, config: Config, said: str
) -> None:
    """A resume answered chunked, with the blob's rest followed by megabytes more, under
    the right Content-Range (the body is cut at its length) or one that gives neither end
    nor size (the download stops at the size the first answer gave): no byte past the
    blob's size goes to the disk or to the client, whose connection is cut short of the
    Content-Length it was told."""
    layer = os.urandom(512 * 1024)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    extra = 4 * 1024 * 1024

    async def blob(request: web.Request) -> web.StreamResponse:
        first = int(request.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        if first == 0:  # the first answer breaks off halfway
            resp = web.StreamResponse(headers={"Content-Length": str(len(layer))})
            await resp.prepare(request)
            await resp.write(layer[: len(layer) // 2])
            await asyncio.sleep(0.2)
            assert request.transport is not None
            request.transport.close()
            return resp
        span = (
            f"bytes {first}-{len(layer) - 1}/{len(layer)}"
            if said == "range"
            else f"bytes {first}-*/*"
        )
        resp = web.StreamResponse(status=206, headers={"Content-Range": span})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(layer[first:])
        for _ in range(extra // (256 * 1024)):
            await resp.write(b"j" * (256 * 1024))
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(upstream)
    url = f"http://127.0.0.1:{server.port}"
    mirror = await aiohttp_client(create_app(replace(config, upstream=UpstreamConfig(url=url))))

    head, rest = await _raw_get(mirror, f"/v2/library/app/blobs/{digest}")

    assert f"Content-Length: {len(layer)}\r\n".encode() in head
    assert len(rest) < len(layer)  # cut: the last byte is held until the digest matches
    assert rest == layer[: len(rest)]
    assert _upstream_bytes(mirror) <= len(layer)
    assert not blob_file(config, digest).exists()


async def test_a_download_is_sent_no_further_than_its_size(tmp_path: Path) -> None:
    """Whatever its file holds (another process's, or a sender's bytes past the end), the
    blob's readers get its size and no more, the last byte once the digest matched."""
    digest = parse_digest("sha256:" + "ab" * 32)
    download = Download(digest, tmp_path / "blob", lambda path: path.open("rb"))
    download.size, download.written = 100, 150
    spans = download.spans(0, None)

    assert await anext(spans) == (0, 99)
    waiting = asyncio.ensure_future(anext(spans))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the last byte waits for the digest
    download.verified = True
    download._notify()
    assert await waiting == (99, 1)
    with pytest.raises(StopAsyncIteration):
        await anext(spans)
