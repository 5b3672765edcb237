"""Running the app: a plain-HTTP site, an HTTPS site, or both at once (a migration).

`web.run_app` takes one SSL context for all of its sites, so `serve` runs its own
`AppRunner` with a site per listener, and stops it gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from mirror.config import ConfigError
from mirror.web.accesslog import AccessLogger


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    key: str = "listen"  # the setting that moves it, named when its address is taken


def run(
    app: web.Application,
    listeners: list[Listener],
    shutdown_timeout: float,
    on_bound: Callable[[], None] = lambda: None,
) -> None:
    """Serve `app` on every listener until SIGTERM or SIGINT, then shut down gracefully.

    Every address is bound before the app starts, so a taken port fails at once as a
    ConfigError naming the setting, and `on_bound` (the "serving on" line) runs only after.
    """
    sockets = [bind(listener) for listener in listeners]
    try:
        asyncio.run(
            _serve(app, list(zip(listeners, sockets, strict=True)), shutdown_timeout, on_bound)
        )
    finally:
        for sock in sockets:
            sock.close()


def bind(listener: Listener) -> socket.socket:
    """A listening socket on the listener's address, or a ConfigError naming its key."""
    try:
        infos = socket.getaddrinfo(
            listener.host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(listener.key, f"cannot listen on {_where(listener)}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        cause = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(
            listener.key,
            f"cannot listen on {_where(listener)}: {cause}; set {listener.key} to a free address",
        ) from None
    sock.setblocking(False)
    return sock


def _where(listener: Listener) -> str:
    return (
        f"[{listener.host}]:{listener.port}"
        if ":" in listener.host
        else f"{listener.host}:{listener.port}"
    )


async def _serve(
    app: web.Application,
    bound: list[tuple[Listener, socket.socket]],
    shutdown_timeout: float,
    on_bound: Callable[[], None],
) -> None:
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        for listener, sock in bound:
            await web.SockSite(runner, sock, ssl_context=listener.ssl_context).start()
        on_bound()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        # Stops accepting, lets requests in flight finish (up to shutdown_timeout), then
        # runs the cleanup contexts.
        await runner.cleanup()
