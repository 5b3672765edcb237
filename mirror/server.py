"""Running the app: a plain-HTTP site, an HTTPS site, or both at once (a migration).

`web.run_app` takes one SSL context for all of its sites, so `serve` runs its own
`AppRunner` with a site per listener, and stops it gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from dataclasses import dataclass

from aiohttp import web

from mirror.logs import AccessLogger


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None


def run(app: web.Application, listeners: list[Listener], shutdown_timeout: float) -> None:
    """Serve `app` on every listener until SIGTERM or SIGINT, then shut down gracefully."""
    asyncio.run(_serve(app, listeners, shutdown_timeout))


async def _serve(app: web.Application, listeners: list[Listener], shutdown_timeout: float) -> None:
    runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        for listener in listeners:
            site = web.TCPSite(
                runner, listener.host, listener.port, ssl_context=listener.ssl_context
            )
            await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        # Stops accepting, lets requests in flight finish (up to shutdown_timeout), then
        # runs the cleanup contexts.
        await runner.cleanup()
