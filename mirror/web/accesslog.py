"""One access line per request, and the request keys the handlers fill in for it.

The access line is built from the request's method, path, status, size and time, never
from its headers: clients' Authorization values must not reach a log.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.observe.logs import REQUEST_ID_HEADER, request_id_var
from mirror.web.forwarded import client_of

# How a request ended when not with its status: "aborted" by us, or "client_closed".
outcome_key = web.RequestKey("outcome", str)
# Body bytes a streamed blob response wrote, counted by the mirror as they went out.
sent_key = web.RequestKey("sent", int)
# The registry a request was routed to, for the access line.
upstream_name_key = web.RequestKey("upstream_name", str)


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes sent. Bodies sent by sendfile bypass aiohttp's byte count (which also
    includes the headers), so a complete response counts its Content-Length and a cut
    one what the mirror counted going out."""
    if request.method == "HEAD":
        return 0
    if request.get(outcome_key) is not None:
        sent: int = request.get(sent_key, 0)
        return sent
    length = response.content_length
    return length if length is not None else response.body_length


class AccessLogger(AbstractAccessLogger):
    """`GET /v2/library/nginx/manifests/latest 200 1234B 0.003s` plus fields for JSON."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "remote": client_of(request),  # the proxy's client with trusted_proxies
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": body_bytes(request, response),
            "duration_s": round(time, 6),
            "user_agent": request.headers.get("User-Agent", "-"),
            "upstream": request.get(upstream_name_key, "-"),
        }
        request_id = response.headers.get(REQUEST_ID_HEADER, "-")
        token = request_id_var.set(request_id)
        try:
            self.logger.info(
                '%s "%s %s" %s %sB %.3fs upstream=%s "%s"',
                fields["remote"], fields["method"], fields["path"], fields["status"],
                fields["bytes"], time, fields["upstream"], fields["user_agent"],
                extra={"access": fields},
            )  # fmt: skip
        finally:
            request_id_var.reset(token)
