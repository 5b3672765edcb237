"""The URL map: the OCI pull API, then operations endpoints."""

from __future__ import annotations

import asyncio
from functools import partial

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler
from prometheus_client.exposition import choose_encoder

from mirror.oci.errors import ExpectationFailed
from mirror.web import handlers
from mirror.web.access import shown_repositories
from mirror.web.catalog import catalog
from mirror.web.errors import error_response
from mirror.web.gate import subject_key
from mirror.web.keys import config_key, metrics_key
from mirror.web.tags import tags_list

# Repository names hold slashes; the handlers validate them against the OCI grammar.
NAME = "{name:[^?#]+?}"


async def expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's `Expect` step (a 100 Continue), but an expectation it cannot meet gets an
    OCI error body: this step runs before the middleware that gives every error one."""
    try:
        await _default_expect_handler(request)
    except web.HTTPExpectationFailed:
        value = request.headers.get(hdrs.EXPECT, "")
        failed = ExpectationFailed(f"the expectation {value[:100]!r} is not supported")
        return error_response(failed, head=request.method == "HEAD")
    return None


def setup_routes(app: web.Application) -> None:
    """The API and operations routes; /metrics and / only when no metrics.listen takes
    them to a listener of their own (mirror/web/monitor.py)."""
    get = partial(web.get, expect_handler=expect)
    app.router.add_routes(
        [
            get("/v2/", handlers.base, name="base"),
            get("/v2/_catalog", catalog, name="catalog"),
            get(f"/v2/{NAME}/manifests/{{reference}}", handlers.manifest, name="manifest"),
            get(f"/v2/{NAME}/blobs/{{digest}}", handlers.blob, name="blob"),
            get(f"/v2/{NAME}/tags/list", tags_list, name="tags"),
            get(f"/v2/{NAME}/referrers/{{digest}}", handlers.referrers, name="referrers"),
            web.route(
                "*",
                "/v2/{tail:.*}",
                handlers.unsupported,
                name="unsupported",
                expect_handler=expect,
            ),
            get("/healthz", handlers.healthz, name="healthz"),
            get("/readyz", handlers.readyz, name="readyz"),
        ]
    )
    if app[config_key].metrics.listen is None:
        app.router.add_routes(monitoring_routes(app))


def monitoring_routes(app: web.Application) -> list[web.RouteDef]:
    """/metrics and the status page of `app` (the mirror's app, wherever they are served)."""

    async def status_page(request: web.Request) -> web.Response:
        app[metrics_key].turn_counts.flush()
        # A client listener's page names what its viewer may pull; the monitoring listener
        # (metrics.listen) is the operator's own address, and names every repository.
        shown = shown_repositories(request) if request.app is app else None
        return await handlers.status_response(app, shown, request.get(subject_key, ""))

    metrics = app[metrics_key]

    async def metrics_page(request: web.Request) -> web.StreamResponse:
        metrics.turn_counts.flush()  # this turn's counts too
        encoder, content_type = choose_encoder(",".join(request.headers.getall(hdrs.ACCEPT, [])))
        names = request.query.getall("name[]", [])
        registry = metrics.exposed_only(names) if names else metrics.exposed
        if request.app is app:  # a client listener (see MONITOR_ONLY)
            registry = metrics.for_clients(registry)
        # In a thread: with workers, collecting reads every worker's files (and a dead
        # worker's stay), work the event loop must not wait on.
        body = await asyncio.to_thread(encoder, registry)
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})
        response.enable_compression()
        return response

    get = partial(web.get, expect_handler=expect)
    return [
        get("/", status_page, name="status"),
        get("/metrics", metrics_page, name="metrics"),
    ]
