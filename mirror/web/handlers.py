"""Request handlers: parse and validate the path, call a service, shape the answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

from mirror.oci.errors import EndpointUnknown, RangeNotSatisfiable, Unsupported
from mirror.oci.negotiation import OCI_INDEX, parse_accept
from mirror.oci.reference import is_digest_reference, parse_digest
from mirror.storage.base import RangeOutsideBlob
from mirror.web.conditional import cache_control, digest_headers, none_match, not_modified
from mirror.web.gate import check_served, route
from mirror.web.keys import (
    blobs_key,
    config_key,
    drain_key,
    manifests_key,
    metadata_key,
    metrics_key,
    pulls_key,
    referrers_key,
    storage_key,
    upstreams_key,
)
from mirror.web.stamp import API_VERSION_HEADER
from mirror.web.status import Samples, render, samples

STALE_WARNING = '110 - "Response is Stale"'


async def base(request: web.Request) -> web.Response:
    """`/v2/`: the API is here, and needs no auth from clients of the mirror."""
    return web.json_response({}, headers=API_VERSION_HEADER)


async def manifest(request: web.Request) -> web.StreamResponse:
    upstream, repo = route(request)
    head = request.method == "HEAD"
    accept = parse_accept(tuple(request.headers.getall("Accept", ())))
    reference = request.match_info["reference"]
    found = await request.app[manifests_key].get(upstream, repo, reference, accept, head=head)
    check_served(request, found.digest, found.index)
    # By digest, the digest asked for: a sha512 one is answered as its sha256 is kept.
    shown = reference if is_digest_reference(reference) else found.digest
    headers = {
        "Content-Type": found.media_type,
        **digest_headers(shown),
        "Cache-Control": cache_control(found.fresh_for),
        "Vary": "Accept",  # the answer depends on it (negotiation.py)
    }
    if found.stale:
        headers["Warning"] = STALE_WARNING
    if none_match(request, shown):
        return not_modified(headers)
    if found.body is not None:
        request.app[pulls_key].add(upstream.catalog_name(repo))
        return web.Response(body=found.body, headers=headers)
    # A HEAD: aiohttp keeps an explicit Content-Length on a Response without a body.
    headers["Content-Length"] = str(found.size)
    return web.Response(headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    upstream, repo = route(request)
    digest = parse_digest(request.match_info["digest"])
    try:
        return await request.app[blobs_key].serve(request, upstream, repo, digest)
    except RangeOutsideBlob as exc:  # the bucket's 416, as a registry answers it
        raise RangeNotSatisfiable(exc.size) from None


async def referrers(request: web.Request) -> web.Response:
    """An OCI index of what refers to the digest, for every upstream (referrers.py)."""
    upstream, repo = route(request)
    digest = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    found = await request.app[referrers_key].get(upstream, repo, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX, "Cache-Control": cache_control(found.fresh_for)}
    if found.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    if found.stale:
        headers["Warning"] = STALE_WARNING
    return web.Response(body=found.body, headers=headers)


async def unsupported(request: web.Request) -> web.Response:
    """Push, delete and anything else that writes: a mirror only serves pulls."""
    if request.method in ("GET", "HEAD"):
        raise EndpointUnknown(f"no such endpoint: {request.path[:200]}")
    raise Unsupported(f"{request.method} is not supported by a pull-through mirror")


async def status_response(
    app: web.Application, shown: Callable[[str], bool] | None = None, viewer: str = ""
) -> web.Response:
    """`/`: what a person checking on the mirror wants to see first, of the mirror's `app`
    (served on the client listeners or metrics.listen's), naming the repositories `shown`
    lets through for `viewer` (None: every one)."""
    # In a thread, as /metrics: with workers, collecting reads every worker's files.
    values = await asyncio.to_thread(_collect, app)
    body = render(app[config_key], app[upstreams_key], values, app[pulls_key], shown, viewer)
    return web.Response(text=body, content_type="text/html")


def _collect(app: web.Application) -> Samples:
    """The page's figures and the other workers' pulls (blocking: with workers, files)."""
    app[pulls_key].refresh()
    return samples(app[metrics_key])


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready when the storage takes writes and the metadata store answers, and the
    process is not stopping (a load balancer then sends its requests elsewhere)."""
    if request.app[drain_key].draining:
        return web.Response(
            status=503, text=json.dumps({"shutdown": "draining"}) + "\n",
            content_type="application/json",
        )  # fmt: skip
    checks = {
        "storage": "ok" if await request.app[storage_key].is_writable() else "not writable",
        "metadata": "ok",
        **await request.app[storage_key].health(),
    }
    try:
        await request.app[metadata_key].ping()
    except Exception as exc:  # any failure to answer means not ready; say which kind
        checks["metadata"] = f"unreachable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    cluster = request.app[config_key].cluster
    if cluster is not None:  # which replica answered, behind a load balancer
        checks["replica"] = cluster.replica_id
    return web.Response(
        status=200 if ready else 503,
        text=json.dumps(checks) + "\n",
        content_type="application/json",
    )
