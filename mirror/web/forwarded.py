"""The request's origin: its client address, scheme and host, proxy headers weighed.

`request.remote`, `request.scheme` and `request.host` are the TCP peer's and the request
line's; behind a trusted proxy the client is someone else. The middleware works it out
once (mirror/net/proxies.py) and keeps it on the request, so the access line, the audit
line and the token realm all name the same client; `request.clone()` would not do, as
the access logger sees the original request and its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter

from mirror.net.proxies import Origin, TrustedProxies

FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")
origin_key = web.RequestKey("origin", Origin)


@dataclass(frozen=True)
class ProxyTrust:
    """The trusted proxies, and the counter of proxy headers ignored from anyone else."""

    proxies: TrustedProxies
    ignored: Counter  # mirror_forwarded_headers_ignored_total


proxy_trust_key = web.AppKey("proxy_trust", ProxyTrust)


def origin_of(request: web.BaseRequest) -> Origin:
    """The request's origin (the TCP peer's when no proxy header was weighed)."""
    origin = request.get(origin_key)
    if isinstance(origin, Origin):
        return origin
    return Origin(request.remote or "-", request.scheme, request.host)


def client_of(request: web.BaseRequest) -> str:
    """The client's address: what logs and per-client limits should use."""
    origin = request.get(origin_key)
    return origin.client if isinstance(origin, Origin) else request.remote or "-"


def record_origin(request: web.Request) -> None:
    """Record the request's origin (first thing, in web/middleware.py) when a proxy header
    was sent; count proxy headers from peers not trusted to send them. Without any, the
    origin is the TCP peer's, worked out only when asked (`origin_of`)."""
    present = request.headers
    # Every line of each, in order, as one list: a proxy may append a line of its own
    # (haproxy's `option forwardfor` does) after one its client sent.
    headers = {
        name: ", ".join(present.getall(name)) for name in FORWARDED_HEADERS if name in present
    }
    if not headers:
        return
    peer = request.remote or "-"
    trust = request.app[proxy_trust_key]
    if not trust.proxies.trusts(peer):
        trust.ignored.inc()
        return  # believed from nobody else: the origin is the TCP peer's
    request[origin_key] = trust.proxies.origin(peer, request.scheme, request.host, headers)
