"""The monitoring listener (`metrics.listen`): /metrics and the status page on their own
address, e.g. loopback or an internal network, and nowhere else.

It is a second, small application serving the mirror app's registry and status; the
mirror app starts first, so the status page finds the upstreams it reports on.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.oci.errors import RegistryError
from mirror.web.access import client_auth_key
from mirror.web.errors import error_response
from mirror.web.keys import config_key
from mirror.web.routes import monitoring_routes

mirror_app_key = web.AppKey("mirror_app", web.Application)


def create_monitor_app(app: web.Application) -> web.Application:
    """The application of the monitoring listener, for the mirror application `app`."""
    monitor = web.Application(middlewares=[monitor_auth_middleware])
    monitor[mirror_app_key] = app
    monitor.router.add_routes(monitoring_routes(app))
    return monitor


@web.middleware
async def monitor_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """metrics.require_auth holds here as on the client listeners."""
    app = request.app[mirror_app_key]
    auth = app.get(client_auth_key)
    if auth is not None and app[config_key].metrics.require_auth:
        try:
            await auth.require_user(request)
        except RegistryError as exc:
            return error_response(exc, head=request.method == "HEAD")
    return await handler(request)
