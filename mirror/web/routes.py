"""The URL map: the OCI pull API, then operations endpoints."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from mirror.web import handlers
from mirror.web.keys import metrics_key

# Repository names hold slashes; the handlers validate them against the OCI grammar.
NAME = "{name:[^?#]+?}"


def setup_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.get("/v2/", handlers.base, name="base"),
            web.get("/v2/_catalog", handlers.catalog, name="catalog"),
            web.get(f"/v2/{NAME}/manifests/{{reference}}", handlers.manifest, name="manifest"),
            web.get(f"/v2/{NAME}/blobs/{{digest}}", handlers.blob, name="blob"),
            web.get(f"/v2/{NAME}/tags/list", handlers.tags_list, name="tags"),
            web.get(f"/v2/{NAME}/referrers/{{digest}}", handlers.referrers, name="referrers"),
            web.route("*", "/v2/{tail:.*}", handlers.unsupported, name="unsupported"),
            web.get("/", handlers.status_page, name="status"),
            web.get("/healthz", handlers.healthz, name="healthz"),
            web.get("/readyz", handlers.readyz, name="readyz"),
            web.get("/metrics", make_aiohttp_handler(app[metrics_key].registry), name="metrics"),
        ]
    )
