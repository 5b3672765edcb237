"""One log record per request: the access line, or for a manifest request its audit line
carrying the access fields too; and the request keys the handlers fill in for them.

The access line is built from the request's method, path, status, size and time, never
from its headers: clients' Authorization values must not reach a log. A manifest request's
one record is its access line followed by the audit fields (audit.py), on the
`mirror.audit` logger at any log level, so those who keep or ship the audit apart route
that logger; nothing is written twice.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.observe.logs import REQUEST_ID_HEADER, log_request_line
from mirror.web.audit import audit_fields, audit_key, audit_text
from mirror.web.forwarded import client_of

# How a request ended when not with its status: "aborted" by us, or "client_closed".
outcome_key = web.RequestKey("outcome", str)
# Body bytes a streamed blob response wrote, counted by the mirror as they went out.
sent_key = web.RequestKey("sent", int)
# The registry a request was routed to, for the access line.
upstream_name_key = web.RequestKey("upstream_name", str)
ACCESS_FORMAT = '%s "%s %s" %s %sB %.3fs upstream=%s "%s"'
# A response cut after its head: its access line, then how it ended (outcome_key).
CUT_FORMAT = ACCESS_FORMAT + " outcome=%s"
# A manifest request's one record: its access line, then what only the audit says.
AUDIT_FORMAT = ACCESS_FORMAT + " %s"


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
    """`GET /v2/library/nginx/manifests/latest 200 1234B 0.003s` plus fields for JSON.

    The app's own (create_app passes it as a handler argument), so every server of the
    app writes audit lines, tests' included. Called for every request (`enabled` stays
    True): the audit line is written at any log level.
    """

    audit = logging.getLogger("mirror.audit")

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        pending = request.get(audit_key)
        logger = self.logger if pending is None else self.audit
        if not logger.isEnabledFor(logging.INFO):
            return
        request_id = response.headers.get(REQUEST_ID_HEADER, "-")
        args = _access_args(request, response, time)
        shown = _quoted(args)
        # The fields by name are for JSON lines (and other handlers' records) only: a text
        # line, nearly every line, is made from `shown` alone.
        if pending is None:
            cut = request.get(outcome_key)
            if cut is None:
                log_request_line(logger, ACCESS_FORMAT, shown, lambda: _by_name(args), request_id)
            else:  # the status went out with the head: the line says the body did not, whole
                log_request_line(
                    logger, CUT_FORMAT, (*shown, cut),
                    lambda: _by_name(args) | {"outcome": cut}, request_id,
                )  # fmt: skip
            return
        text = audit_text(pending, response)
        log_request_line(
            logger, AUDIT_FORMAT, (*shown, text),
            lambda: _by_name(args) | audit_fields(pending, request, response), request_id,
        )  # fmt: skip


def _access_args(
    request: web.BaseRequest, response: web.StreamResponse, time: float
) -> tuple[Any, ...]:
    """What the access line says, in ACCESS_FORMAT's order."""
    return (
        client_of(request),  # the proxy's client with trusted_proxies
        request.method, request.path, response.status, body_bytes(request, response), time,
        request.get(upstream_name_key, "-"), request.headers.get("User-Agent", "-"),
    )  # fmt: skip


def _quoted(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The access line's args as the line shows them: the path and User-Agent, written
    between double quotes, with their own quotes and backslashes escaped, so that neither
    can close its quotes and add fields of its own (a second `user=`)."""
    remote, method, path, status, sent, time, upstream, user_agent = args
    return (remote, method, _inside_quotes(path), status, sent, time, upstream,
            _inside_quotes(user_agent))  # fmt: skip


def _inside_quotes(text: str) -> str:
    if '"' not in text and "\\" not in text:
        return text
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _by_name(args: tuple[Any, ...]) -> dict[str, Any]:
    """The access line's fields by name, as JSON lines hold them."""
    remote, method, path, status, sent, time, upstream, user_agent = args
    return {
        "remote": remote, "method": method, "path": path, "status": status, "bytes": sent,
        "duration_s": round(time, 6), "user_agent": user_agent, "upstream": upstream,
    }  # fmt: skip
