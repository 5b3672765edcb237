"""aiohttp alone, for the manifest rows: one route answering the manifest's bytes with the
headers the mirror sends, on the mirror's event loop (uvloop), with no middleware, policy,
audit line, metrics or cache behind it. What the framework costs a request on this machine
is the floor under the mirror's figure; the rest of the mirror's cost is its own work.

    python -m tests.bench.floor PORT MANIFEST_FILE
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from tests.services import Service, free_port, http_status

MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def floor_app(body: bytes) -> web.Application:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {
        "Content-Type": MEDIA_TYPE,
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=300",
        "Vary": "Accept",
        "X-Request-ID": "0123456789abcdef",
        "Docker-Distribution-API-Version": "registry/2.0",
        "X-Content-Type-Options": "nosniff",
    }

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    return app


class FrameworkFloor(Service):
    """`python -m tests.bench.floor` on a free port of 127.0.0.1."""

    name = "aiohttp-floor"

    def __init__(self, workdir: Path | str, manifest: bytes) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.body_path = self.workdir / "manifest.json"
        self.body_path.write_bytes(manifest)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.bench.floor", str(self.port), str(self.body_path)]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/v2/x/manifests/latest") == 200


def main() -> None:
    port, path = int(sys.argv[1]), Path(sys.argv[2])
    app = floor_app(path.read_bytes())
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
