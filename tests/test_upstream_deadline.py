"""An upstream whose answers trickle, a byte at a time inside the read timeout: each small
exchange (a manifest, a HEAD, a token) still ends within connect + 2 × read timeouts,
so a pull fails (or is served stale) in seconds rather than held for as long as the
trickle lasts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirror.config import CacheConfig, Config, StorageConfig, UpstreamConfig
from mirror.upstream import body
from mirror.upstream.deadline import exchange_deadline
from mirror.web.app import create_app

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
REPO = "library/drip"
BODY = json.dumps({"schemaVersion": 2, "mediaType": DOCKER, "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
TIMEOUTS = (0.5, 0.5)  # connect, read: a byte every 0.3 s never trips the read timeout
DEADLINE = exchange_deadline(*TIMEOUTS)
DRIP = 0.3


def mirror_config(upstream: str, tmp_path: Path, **cache: Any) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        upstream=UpstreamConfig(
            url=upstream, connect_timeout=TIMEOUTS[0], read_timeout=TIMEOUTS[1]
        ),
        storage=StorageConfig(path=tmp_path / "data"),
        cache=CacheConfig(**cache),
    )


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(DRIP)


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Serve], Awaitable[str]]]:
    """A plain TCP server speaking just enough HTTP/1.1 to trickle: its URL."""
    servers: list[asyncio.Server] = []

    async def start(serve: Serve) -> str:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def head(status: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join([*lines, f"Content-Length: {length}", "", ""])).encode()


MANIFEST_HEADERS = {"Content-Type": DOCKER, "Docker-Content-Digest": DIGEST}


async def test_a_manifest_that_trickles_fails_within_the_deadline(
    raw_upstream: Callable[[Serve], Awaitable[str]], aiohttp_client: Any, tmp_path: Path
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET /v2/ "):
                writer.write(head("200 OK", {}, 0))
                continue
            writer.write(head("200 OK", MANIFEST_HEADERS, len(BODY)))
            if request.startswith(b"HEAD "):  # the tag's HEAD: headers alone, at once
                continue
            await trickle(writer, BODY)  # len(BODY) × 0.3 s: about half a minute

    url = await raw_upstream(serve)
    client = await aiohttp_client(create_app(mirror_config(url, tmp_path)))
    started = time.monotonic()
    resp = await client.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": DOCKER})
    took = time.monotonic() - started
    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert DEADLINE <= took < DEADLINE + 2, took


async def test_a_revalidation_that_trickles_serves_the_tag_stale_within_the_deadline(
    raw_upstream: Callable[[Serve], Awaitable[str]], aiohttp_client: Any, tmp_path: Path
) -> None:
    heads = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal heads
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET "):
                writer.write(head("200 OK", MANIFEST_HEADERS, len(BODY)) + BODY)
                continue
            heads += 1
            if heads == 1:  # the unknown tag's HEAD, at once
                writer.write(head("200 OK", MANIFEST_HEADERS, len(BODY)))
            else:  # the revalidation's HEAD: its head, a byte at a time
                await trickle(writer, head("200 OK", {"X-Filler": "a" * 60}, 0))

    url = await raw_upstream(serve)
    config = mirror_config(url, tmp_path, tag_ttl=0.5, stale_if_error=3600)
    client = await aiohttp_client(create_app(config))
    resp = await client.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": DOCKER})
    assert resp.status == 200
    await asyncio.sleep(0.7)  # past the TTL: the next GET revalidates
    started = time.monotonic()
    resp = await client.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": DOCKER})
    took = time.monotonic() - started
    assert resp.status == 200 and await resp.read() == BODY
    assert "110" in resp.headers.get("Warning", "")  # served stale, and said so
    assert took < DEADLINE + 2, took


async def test_a_token_service_that_trickles_fails_within_the_deadline(
    raw_upstream: Callable[[Serve], Awaitable[str]],
    aiohttp_client: Any,
    aiohttp_server: Any,
    tmp_path: Path,
) -> None:
    token = json.dumps({"token": "t" * 40, "expires_in": 300}).encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head("200 OK", {"Content-Type": "application/json"}, len(token)))
        await trickle(writer, token)

    realm = await raw_upstream(serve)

    async def registry(request: web.Request) -> web.Response:
        challenge = f'Bearer realm="{realm}/token",service="drip"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
            headers={"WWW-Authenticate": challenge},
        )  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", registry)
    server = await aiohttp_server(app)
    upstream = f"http://127.0.0.1:{server.port}"
    client = await aiohttp_client(create_app(mirror_config(upstream, tmp_path)))
    started = time.monotonic()
    resp = await client.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": DOCKER})
    took = time.monotonic() - started
    assert resp.status == 503
    assert took < DEADLINE + 2, took


async def test_an_announced_size_reserves_no_more_disk_than_the_bytes_sent(
    raw_upstream: Callable[[Serve], Awaitable[str]], aiohttp_client: Any, tmp_path: Path
) -> None:
    """A blob's Content-Length was reserved whole before a byte came: an upstream that
    announces 2 GiB per layer and trickles fills the disk with reservations (every other
    download then fails for want of space) while it sends almost nothing."""
    announced = 2 * 1024**3
    released = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head("200 OK", {}, announced))
        while not released.is_set():
            writer.write(b"x" * 1024)
            await writer.drain()
            await asyncio.sleep(0.2)

    url = await raw_upstream(serve)
    config = mirror_config(url, tmp_path)
    client = await aiohttp_client(create_app(config))
    digest = "sha256:" + "d" * 64
    fetch = asyncio.create_task(client.get(f"/v2/{REPO}/blobs/{digest}"))
    tmp = tmp_path / "data" / "tmp"
    try:
        for _ in range(50):  # the temp file, once made
            await asyncio.sleep(0.1)
            temps = [p for p in tmp.glob("blob-*")] if tmp.is_dir() else []
            if temps:
                break
        assert temps, "no download started"
        await asyncio.sleep(0.5)
        allocated = sum(p.stat().st_blocks * 512 for p in temps)
        assert allocated < 256 * 1024 * 1024, allocated  # a step ahead of the bytes, no more
    finally:
        released.set()
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)


async def test_a_blob_body_that_trickles_is_given_up_not_waited_on(
    raw_upstream: Callable[[Serve], Awaitable[str]],
    aiohttp_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each read within the read timeout, the whole at a few hundred bytes a second: the
    download, and every client waiting on it, went on for as long as the sender liked."""
    monkeypatch.setattr(body, "PACE_WINDOW", 1.0)  # 60 s as shipped
    data = b"x" * (1024 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head("200 OK", {}, len(data)))
        for start in range(0, len(data), 100):  # 100 bytes every 0.1 s: 1 KB/s
            writer.write(data[start : start + 100])
            await writer.drain()
            await asyncio.sleep(0.1)

    url = await raw_upstream(serve)
    client = await aiohttp_client(create_app(mirror_config(url, tmp_path)))
    started = time.monotonic()

    async def fetch() -> bytes:
        resp = await client.get(f"/v2/{REPO}/blobs/{digest}")
        return bytes(await resp.read())

    with pytest.raises(aiohttp.ClientPayloadError):  # cut short, never complete-looking
        await asyncio.wait_for(fetch(), 10)
    assert time.monotonic() - started < 5
    tmp = tmp_path / "data" / "tmp"
    for _ in range(50):
        if not any(tmp.glob("blob-*")):
            break
        await asyncio.sleep(0.1)
    assert not any(tmp.glob("blob-*"))  # the download gave up and let its file go
