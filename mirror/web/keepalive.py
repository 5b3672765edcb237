"""aiohttp's request handler for a guarded connection, saying when it sits idle in keep-alive.

The connection guard (connections.py) sees the bytes that come in, not when an answer is
done; aiohttp knows. `log_access` is the one call aiohttp makes for every request once its
response is written out (after `write_eof`: a sendfile body is sent by then), on its error
paths too, so the handler reports there, for a few hundred nanoseconds a request, no task
or coroutine of its own. A request already parsed and queued behind it (pipelined, in
aiohttp's `_messages`) keeps the connection busy; bytes arriving later are the guard's to
see. tests/test_connections.py fails should aiohttp change either.

It also answers a request aiohttp could not parse (a bad header, a line too long) itself:
aiohttp's answer is text quoting the bytes sent (8 KiB of them, credentials too), before
any middleware. Here it is an OCI 400 naming the kind of fault, logged as one DEBUG line
that names it too, not an ERROR with a traceback: any client can send one, as often as it
likes, and the access line records its 400 already.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from mirror.oci.errors import RequestMalformed
from mirror.web.connections import OnIdle, ProtocolFactory
from mirror.web.errors import error_response

# The parser's faults in words of the mirror's own: aiohttp's messages quote the bytes.
_FAULTS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "request line or header field too long"),
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid header field"),
    (PayloadEncodingError, "invalid message body"),
)
# llhttp raises most as a plain BadHttpMessage, its reason (the message's first line) naming
# the header at fault: read for these words only, never repeated.
_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("content-length", "transfer-encoding"), "Content-Length with Transfer-Encoding"),
    (("content-length",), "invalid Content-Length"),
    (("transfer-encoding",), "invalid Transfer-Encoding"),
    (("chunk",), "invalid chunked body"),
    (("too many headers",), "too many header fields"),
    (("header",), "invalid header field"),
)


def parse_fault(exc: HttpProcessingError) -> str:
    """What was wrong with a request the parser refused, in a fixed phrase."""
    for kind, fault in _FAULTS:
        if isinstance(exc, kind):
            return fault
    reason = str(exc.message).partition("\n")[0].lower()
    for words, fault in _REASONS:
        if all(word in reason for word in words):
            return fault
    return "malformed request"


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

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        fault = parse_fault(exc)
        self.logger.debug("bad request (%s) from %s", fault, self._peer())
        if request.writer.output_size > 0:  # as aiohttp: too late for an answer of its own
            raise ConnectionError("response already begun, cannot answer a bad request")
        resp = error_response(RequestMalformed(fault))
        resp.force_close()
        return resp

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
