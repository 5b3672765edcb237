"""The headers every answer carries: its request id, and on the registry API the API
version and `nosniff`. Put on by the middleware for the answers handlers return, and by
handlers that stream (blobs.py, peer.py) just before they send the head: one call where a
prepare signal was one more coroutine on every request."""

from __future__ import annotations

import time

from aiohttp import web

from mirror.observe.logs import REQUEST_ID_HEADER

API_VERSION = "Docker-Distribution-API-Version"
API_VERSION_VALUE = "registry/2.0"
API_VERSION_HEADER = {API_VERSION: API_VERSION_VALUE}
request_id_key = web.RequestKey("request_id", str)
# When a streamed answer's head went out: the request's duration ends there, not when its
# body did (a client reading a large blob slowly would otherwise time the client).
head_sent_key = web.RequestKey("head_sent", float)


def stamp(request: web.BaseRequest, response: web.StreamResponse) -> None:
    headers = response.headers
    request_id = request.get(request_id_key)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    if request.path.startswith("/v2"):
        headers[API_VERSION] = API_VERSION_VALUE
        # Manifests, blobs and errors are data, never a page: a browser must not sniff an
        # upstream's bytes into HTML or script.
        headers["X-Content-Type-Options"] = "nosniff"


async def prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`response.prepare(request)`, stamped first; the time it was sent noted (before
    the send: from then on a failure cannot be answered with an error of its own)."""
    stamp(request, response)
    request[head_sent_key] = time.monotonic()
    await response.prepare(request)
