"""The one middleware every request passes: request id, the origin (proxy headers
weighed), client auth, the pull gate, OCI error bodies and the request metrics.

Client auth (access.py) and the pull gate (gate.py) are plain calls from here rather than
middlewares of their own: each middleware is one more coroutine per request, and their
order never changes (the gate needs the user auth names, and both answer with OCI errors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter, Histogram

from mirror.observe.logs import REQUEST_ID_HEADER, RequestIds, request_id_var
from mirror.observe.metrics import Children, Metrics
from mirror.oci.errors import EndpointUnknown, RegistryError, Unsupported
from mirror.web.access import authorize, challenge_instead
from mirror.web.accesslog import outcome_key, upstream_name_key
from mirror.web.errors import error_response
from mirror.web.forwarded import record_origin
from mirror.web.gate import AnonymousRefused, check_pull
from mirror.web.keys import failures_key
from mirror.web.stamp import head_sent_key, request_id_key, stamp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)
# What a client learns of a fault of ours: nothing of its message (it may quote a secret).
INTERNAL = RegistryError("internal error: the mirror's log holds it under this request id")


class RequestSeries:
    """What the middleware keeps between requests: the id source and the metric series."""

    def __init__(self, metrics: Metrics) -> None:
        self.ids = RequestIds()
        self.requests: Children[Counter] = Children(metrics.http_requests)
        self.counts = metrics.turn_counts
        self.durations: Children[Histogram] = Children(metrics.http_duration)


series_key = web.AppKey("request_series", RequestSeries)


@web.middleware
async def registry_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OCI error bodies for every failure, and one request metric per answer."""
    started = time.monotonic()
    series = request.app[series_key]
    route = request.match_info.route.name or "unmatched"
    status = "aborted"
    try:
        resp = await _answer(request, handler, series.ids)
        status = request.get(outcome_key) or str(resp.status)
        return resp
    except ConnectionError:
        status = "client_closed"
        raise
    except Exception:
        status = "500"  # what aiohttp answers for it
        raise
    finally:
        series.counts.inc(series.requests(route, request.method, status))
        ended = request.get(head_sent_key) or time.monotonic()
        series.durations(route).observe(ended - started)


async def _answer(request: web.Request, handler: Handler, ids: RequestIds) -> web.StreamResponse:
    request_id = ids(request.headers.get(REQUEST_ID_HEADER))
    request_id_var.set(request_id)  # each request runs in its own task: no reset needed
    request[request_id_key] = request_id
    try:
        record_origin(request)
        await authorize(request)
        try:
            check_pull(request)
        except AnonymousRefused:
            raise challenge_instead(request) from None
        response = await handler(request)
    except (RegistryError, web.HTTPMethodNotAllowed, web.HTTPNotFound) as exc:
        response = _error(request, exc)
    except (ConnectionError, web.HTTPException):
        raise  # the client left; or an answer aiohttp writes itself
    except Exception:
        if request.get(head_sent_key) is not None:
            raise  # the head went out: cutting the connection is all that tells the client
        # A fault of ours: the client gets an OCI error it can show, the log the
        # traceback (redacted by the formatter), found again by the request id.
        log.exception("unexpected error answering %s %s", request.method, request.path[:200])
        response = error_response(INTERNAL, head=request.method == "HEAD")
    if not response.prepared:  # a streamed answer was stamped before its head went out
        stamp(request, response)
    return response


def _error(
    request: web.Request, exc: RegistryError | web.HTTPMethodNotAllowed | web.HTTPNotFound
) -> web.Response:
    """The OCI error body for a refusal, ours or the router's."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        exc = Unsupported(f"{request.method} is not supported by a pull-through mirror")
    elif isinstance(exc, web.HTTPNotFound):
        exc = EndpointUnknown(f"no such endpoint: {request.path[:200]}")
    elif exc.from_upstream:
        upstream = request.get(upstream_name_key, "-")
        repository = request.match_info.get("name", "-")
        request.app[failures_key].warn(upstream, repository, exc, exc.message)
    return error_response(exc, head=request.method == "HEAD")
