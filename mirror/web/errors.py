"""Registry errors as HTTP responses: the OCI error body with the error's status and headers."""

from __future__ import annotations

from aiohttp import web

from mirror.oci.errors import RegistryError


def error_response(error: RegistryError, *, head: bool = False) -> web.Response:
    """The OCI error body (none for HEAD, its length still given) and the error's headers."""
    body = error.body()
    headers = {"Content-Type": "application/json", **error.headers()}
    if head:
        headers["Content-Length"] = str(len(body))
        return web.Response(status=error.status, headers=headers)
    return web.Response(status=error.status, body=body, headers=headers)
