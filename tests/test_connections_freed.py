"""A connection the guard wraps (mirror/web/connections.py) is freed as it closes, by
reference counting alone: what it held (over HTTPS, its TLS state and buffers, hundreds of
KiB after a large body) does not wait for a full garbage collection, which a server
that makes few objects may not run for a long time.

    raw socket client ──(http|https)──> GuardedSite (mirror/web/server.py) in this process
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror.observe.guard_metrics import GuardMetrics
from mirror.web.connections import ConnectionGuard, GuardedConnection
from mirror.web.server import GuardedSite
from tests.certs import CA, client_context

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Runs a test on the event loop asked for, with the cyclic garbage collector off."""
    factory = None
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    def go(test: Callable[[], Awaitable[None]]) -> None:
        gc.collect()
        gc.disable()
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(test())  # type: ignore[arg-type]
        finally:
            gc.enable()

    yield go


def guarded_connections() -> int:
    return sum(isinstance(o, GuardedConnection) for o in gc.get_objects())


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def served_once(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> None:
    """One request answered on a kept-alive connection, which the client then closes; then
    the connection must be gone, every reference to it dropped."""
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    guard = ConnectionGuard(8, 5.0, GuardMetrics(CollectorRegistry()))
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = GuardedSite(runner, sock, guard, ssl_context=tls[0] if tls else None)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls[1] if tls else None,
            server_hostname="127.0.0.1" if tls else None,
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"hello"
        assert guarded_connections() == 1
        writer.close()
        await writer.wait_closed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while guarded_connections() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert guarded_connections() == 0, "the closed connection is still referenced"
    finally:
        await runner.cleanup()


def test_a_closed_connection_is_freed_without_a_garbage_collection(run: Run) -> None:
    run(lambda: served_once(None))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_closed_https_connection_is_freed_without_a_garbage_collection(
    run: Run, tmp_path: Path
) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pair.cert, pair.key)
    run(lambda: served_once((server, client_context(ca.cert))))
