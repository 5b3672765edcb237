"""net/splice.py against a real HTTP server on loopback: the body lands in the file byte
for byte (held with the head or spliced), progress grows to the length, and every way a
sender can go wrong ends in BodyBroken, never in a file that looks whole; a stop is
prompt; the file's own failures stay OSErrors."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.net.splice import BodyBroken, SplicedGet, Stopped, can_splice

MiB = 1024 * 1024
BODY = os.urandom(5 * MiB + 123)


async def whole(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    return web.Response(body=BODY[:size], content_type="application/octet-stream")


async def cut(request: web.Request) -> web.StreamResponse:
    """Headers promising all of BODY, half of it, then the connection dropped."""
    resp = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
    await resp.prepare(request)
    await resp.write(BODY[: len(BODY) // 2])
    await asyncio.sleep(0.1)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def stall(request: web.Request) -> web.StreamResponse:
    """Headers and a first MiB, then nothing for longer than any test waits."""
    resp = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
    await resp.prepare(request)
    await resp.write(BODY[:MiB])
    await asyncio.sleep(30)
    return resp


async def trickle(request: web.Request) -> web.StreamResponse:
    """64 KiB in pieces of 2 KiB every 0.1 s (3.2 s): never a pipe's worth waiting at once."""
    resp = web.StreamResponse(headers={"Content-Length": str(64 * 1024)})
    await resp.prepare(request)
    for i in range(32):
        await resp.write(BODY[i * 2048 : (i + 1) * 2048])
        await asyncio.sleep(0.1)
    return resp


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b"no length")
    await resp.write_eof()
    return resp


async def overlong(request: web.Request) -> web.StreamResponse:
    """A Content-Length of 10 with more than that sent along with the head."""
    assert request.transport is not None
    request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 100)
    await asyncio.sleep(0.2)
    request.transport.close()
    return web.Response()


async def silent(request: web.Request) -> web.StreamResponse:
    """The request taken, no answer for seconds (a hanging gateway)."""
    await asyncio.sleep(3)
    return web.Response()


async def late_body(request: web.Request) -> web.StreamResponse:
    """The head at once, the body a second later."""
    resp = web.StreamResponse(headers={"Content-Length": "1024"})
    await resp.prepare(request)
    await asyncio.sleep(1.0)
    await resp.write(BODY[:1024])
    return resp


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/whole/{size}", whole)
    app.router.add_get("/cut", cut)
    app.router.add_get("/stall", stall)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/overlong", overlong)
    app.router.add_get("/silent", silent)
    app.router.add_get("/late", late_body)
    async with TestServer(app, host="127.0.0.1") as srv:
        yield srv


def url(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


async def splice(
    get: SplicedGet, path: Path, stop: threading.Event | None = None
) -> tuple[int, list[int]]:
    """Open `get` and splice its body into a new file at `path`: (bytes, progress)."""
    seen: list[int] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await asyncio.to_thread(get.open)
        done = await asyncio.to_thread(get.splice_into, fd, seen.append, stop or threading.Event())
    finally:
        os.close(fd)
        get.close()
    return done, seen


@pytest.mark.parametrize("size", [0, 100, 64 * 1024, len(BODY)])
async def test_a_body_lands_in_the_file_byte_for_byte(
    server: TestServer, tmp_path: Path, size: int
) -> None:
    get = SplicedGet(url(server, f"/whole/{size}"), timeout=5)
    done, seen = await splice(get, tmp_path / "out")
    assert (get.status, get.length, done) == (200, size, size)
    assert (tmp_path / "out").read_bytes() == BODY[:size]
    assert seen == sorted(seen) and seen[-1] == size
    if size == len(BODY):
        assert len(seen) > 2  # reported as it landed, not once at the end


async def test_a_status_and_length_are_read_before_any_body(
    server: TestServer, tmp_path: Path
) -> None:
    get = SplicedGet(url(server, "/nowhere"), timeout=5)
    await asyncio.to_thread(get.open)
    get.close()
    assert get.status == 404


async def test_a_body_cut_short_is_broken(server: TestServer, tmp_path: Path) -> None:
    with pytest.raises(BodyBroken, match="closed|reset"):
        await splice(SplicedGet(url(server, "/cut"), timeout=5), tmp_path / "out")


async def test_a_sender_that_stalls_times_out(server: TestServer, tmp_path: Path) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(BodyBroken, match="no bytes for 0.5s"):
        await splice(SplicedGet(url(server, "/stall"), timeout=0.5), tmp_path / "out")
    assert asyncio.get_running_loop().time() - started < 5


async def test_the_head_is_held_to_its_own_timeout_and_the_body_to_the_read_timeout(
    server: TestServer, tmp_path: Path
) -> None:
    """A server that takes the request and never answers is given up on after the head
    timeout, not the body's read timeout; a head in time leaves the body its own."""
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await splice(
            SplicedGet(url(server, "/silent"), timeout=30, head_timeout=0.5), tmp_path / "a"
        )
    assert asyncio.get_running_loop().time() - started < 2
    get = SplicedGet(url(server, "/late"), timeout=5, head_timeout=0.5)
    done, _ = await splice(get, tmp_path / "b")
    assert done == 1024
    assert (tmp_path / "b").read_bytes() == BODY[:1024]


async def test_a_slow_sender_is_read_as_it_sends(server: TestServer, tmp_path: Path) -> None:
    """The socket wakes the reader only once a pipe's worth waits (SO_RCVLOWAT), yet a
    sender slower than that is read every poll slice: its bytes keep the read alive. The
    timeout is well short of the whole trickle (a read that waited for the mark would run
    out), and far above its 0.1 s gaps (the sender shares this loop with the test)."""
    get = SplicedGet(url(server, "/trickle"), timeout=2.0)
    done, _ = await splice(get, tmp_path / "out")
    assert done == 64 * 1024
    assert (tmp_path / "out").read_bytes() == BODY[: 64 * 1024]


async def test_a_stop_is_prompt(server: TestServer, tmp_path: Path) -> None:
    stop = threading.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Stopped):
        await splice(SplicedGet(url(server, "/stall"), timeout=30), tmp_path / "out", stop)
    assert asyncio.get_running_loop().time() - started < 2


async def test_no_length_is_not_spliced(server: TestServer, tmp_path: Path) -> None:
    get = SplicedGet(url(server, "/chunked"), timeout=5)
    with pytest.raises(BodyBroken, match="known length"):
        await splice(get, tmp_path / "out")
    assert get.length is None


async def test_more_than_the_length_is_refused(server: TestServer, tmp_path: Path) -> None:
    with pytest.raises(BodyBroken, match="more than its Content-Length"):
        await splice(SplicedGet(url(server, "/overlong"), timeout=5), tmp_path / "out")


async def test_the_file_refusing_is_an_oserror_not_the_sender(
    server: TestServer, tmp_path: Path
) -> None:
    get = SplicedGet(url(server, f"/whole/{len(BODY)}"), timeout=5)
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        await asyncio.to_thread(get.open)
        with pytest.raises(OSError) as caught:
            await asyncio.to_thread(get.splice_into, fd, lambda _: None, threading.Event())
        assert not isinstance(caught.value, BodyBroken)
    finally:
        os.close(fd)
        get.close()


def test_only_plain_http_without_a_proxy_is_spliced(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert can_splice("http://127.0.0.1:7480")
    assert not can_splice("https://s3.amazonaws.com")
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert not can_splice("http://rgw.internal:7480")
    monkeypatch.setenv("no_proxy", "rgw.internal")
    assert can_splice("http://rgw.internal:7480")
