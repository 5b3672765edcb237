"""Logging: text or JSON lines, a request id on every record, one access line per request.

The access line is built from the request's method, path, status, size and time, never
from its headers: clients' Authorization values must not reach a log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# How a request ended when not with its status: "aborted" by us, or "client_closed".
outcome_key = web.RequestKey("outcome", str)
# Body bytes a streamed blob response wrote, counted by the mirror as they went out.
sent_key = web.RequestKey("sent", int)
# The registry a request was routed to, for the access line.
upstream_name_key = web.RequestKey("upstream_name", str)
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "X-Request-ID"
_ACCEPTED_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def new_request_id(incoming: str | None) -> str:
    """The client's (or proxy's) X-Request-ID when it is sane, else a fresh one."""
    if incoming and len(incoming) <= 64 and set(incoming) <= _ACCEPTED_ID:
        return incoming
    return secrets.token_hex(8)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger once, for `mirror serve` and the other commands."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Audit lines (gate.py) are kept whatever the level: they are a record, not chatter.
    logging.getLogger("mirror.audit").setLevel(logging.INFO)


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
            "remote": request.remote,
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
