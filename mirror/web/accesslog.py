"""One access line per request, the audit line of manifest requests, and the request keys
the handlers fill in for them.

The access line is built from the request's method, path, status, size and time, never
from its headers: clients' Authorization values must not reach a log. A manifest request's
record carries the audit fields too (audit.py), and the same fields go to the `mirror.audit`
logger, for those who keep or ship the audit apart, whenever that logger is enabled.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.observe.logs import REQUEST_ID_HEADER, log_info, request_id_var
from mirror.web.audit import audit_fields, audit_key, audit_text
from mirror.web.forwarded import client_of

# How a request ended when not with its status: "aborted" by us, or "client_closed".
outcome_key = web.RequestKey("outcome", str)
# Body bytes a streamed blob response wrote, counted by the mirror as they went out.
sent_key = web.RequestKey("sent", int)
# The registry a request was routed to, for the access line.
upstream_name_key = web.RequestKey("upstream_name", str)
ACCESS_FORMAT = '%s "%s %s" %s %sB %.3fs upstream=%s "%s"'
# Audit fields the access fields do not already hold.
_AUDIT_ONLY = ("user", "repository", "reference", "digest", "outcome", "reason")


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
        audit = None if pending is None else audit_fields(pending, request, response)
        token = request_id_var.set(response.headers.get(REQUEST_ID_HEADER, "-"))
        try:
            if audit is not None:  # first, as when it was written before the answer went out
                # The JSON formatter adds the `access` mapping of a record to its object.
                log_info(self.audit, "pull %s", (audit_text(audit),), audit)
            if self.logger.isEnabledFor(logging.INFO):
                self._access(request, response, time, audit)
        finally:
            request_id_var.reset(token)

    def _access(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        time: float,
        audit: dict[str, Any] | None,
    ) -> None:
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
        args = (
            fields["remote"], fields["method"], fields["path"], fields["status"],
            fields["bytes"], time, fields["upstream"], fields["user_agent"],
        )  # fmt: skip
        if audit is not None:
            fields.update((key, audit[key]) for key in _AUDIT_ONLY if key in audit)
        log_info(self.logger, ACCESS_FORMAT, args, fields)
