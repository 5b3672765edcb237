"""aiohttp's request handler for a guarded connection, saying when it sits idle in keep-alive.

The connection guard (connections.py) sees the bytes that come in, not when an answer is
done; aiohttp knows. `log_access` is the one call aiohttp makes for every request once its
response is written out (after `write_eof`: a sendfile body is sent by then), on its error
paths too, so the handler reports there, for a few hundred nanoseconds a request, no task
or coroutine of its own. A request already parsed and queued behind it (pipelined, in
aiohttp's `_messages`) keeps the connection busy; bytes arriving later are the guard's to
see. tests/test_connections.py fails should aiohttp change either.

It also logs a request aiohttp could not parse (a bad header, a line too long) as one DEBUG
line, not an ERROR with a traceback: any client can send one, as often as it likes, and
the access line records its 400 already.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mirror.web.connections import OnIdle, ProtocolFactory


class IdleReportingHandler(web.RequestHandler):
    """A `web.RequestHandler` that calls `on_idle` after each response that leaves the
    connection open with no further request received whole."""

    __slots__ = ("_on_idle",)

    def __init__(self, manager: web.Server, on_idle: OnIdle, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_idle = on_idle

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        super().log_access(request, response, time)
        # keep_alive is settled once the response is prepared; falsy: aiohttp closes it.
        if response.keep_alive and not self._messages:
            self._on_idle()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            super().log_exception(*args, **kw)
        elif self.logger.isEnabledFor(logging.DEBUG):
            # The message's first line says what was wrong; the rest quotes the bytes sent.
            what = str(exc.message).partition("\n")[0]
            self.logger.debug("bad request (%s %s) from %s", exc.code, what, self._peer())

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "-"


def idle_reporting(server: web.Server) -> ProtocolFactory:
    """Handlers as `server()` makes them (its own arguments), reporting when idle."""
    # Server.__call__ builds RequestHandler(server, loop=..., **server._kwargs); aiohttp has
    # no parameter for the handler class, so the same arguments go to the subclass.
    kwargs = server._kwargs
    loop = asyncio.get_running_loop()
    return lambda on_idle: IdleReportingHandler(server, on_idle, loop=loop, **kwargs)
