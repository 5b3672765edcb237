"""haproxy in front of mirror replicas: round robin, no stickiness, health-checked.

A replica that stops answering `/healthz` is taken out of the rotation within a second or
two, as a Kubernetes Service would drop a pod that fails its readiness probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tests.services import Service, free_port, http_status


class HAProxy(Service):
    """haproxy in the foreground (`-db`), HTTP mode, round robin over `backends`."""

    name = "haproxy"

    def __init__(self, workdir: Path | str, backends: Sequence[str]) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backends = list(backends)
        self.config_path = self.workdir / "haproxy.cfg"

    def config_text(self) -> str:
        servers = []
        for index, url in enumerate(self.backends):
            parts = urlsplit(url)
            servers.append(
                f"    server r{index} {parts.hostname}:{parts.port} check inter 500 fall 2 rise 1"
            )
        return "\n".join(
            [
                "global",
                "    maxconn 4096",
                "defaults",
                "    mode http",
                "    timeout connect 2s",
                # Long enough for a 512 MiB blob to stream on a loaded machine.
                "    timeout client 300s",
                "    timeout server 300s",
                "    option http-keep-alive",
                "frontend mirror",
                f"    bind 127.0.0.1:{self.port}",
                "    default_backend replicas",
                "backend replicas",
                "    balance roundrobin",
                "    option httpchk GET /healthz",
                *servers,
                "",
            ]
        )

    def start(self) -> HAProxy:
        self.config_path.write_text(self.config_text())
        super().start()
        return self

    def command(self) -> list[str]:
        return ["haproxy", "-db", "-f", str(self.config_path)]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/healthz") == 200
