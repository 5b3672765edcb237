"""haproxy in front of mirror replicas: round robin, no stickiness, health-checked.

A replica that stops answering `/healthz` (or the `check_path` given, `/readyz` to take a
draining replica out) is taken out of the rotation within a second or two, as a Kubernetes
Service would drop a pod that fails its readiness probe. With `redispatch`, a request whose
connection to one replica failed is sent to another, as deploy/haproxy/haproxy.cfg does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tests.services import Service, free_port, http_status


class HAProxy(Service):
    """haproxy in the foreground (`-db`), HTTP mode, round robin over `backends`."""

    name = "haproxy"

    def __init__(
        self,
        workdir: Path | str,
        backends: Sequence[str],
        *,
        check_path: str = "/healthz",
        check_interval_ms: int = 500,
        redispatch: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backends = list(backends)
        self.check_path = check_path
        self.check_interval_ms = check_interval_ms
        self.redispatch = redispatch
        self.config_path = self.workdir / "haproxy.cfg"

    def config_text(self) -> str:
        servers = []
        for index, url in enumerate(self.backends):
            parts = urlsplit(url)
            servers.append(
                f"    server r{index} {parts.hostname}:{parts.port}"
                f" check inter {self.check_interval_ms} fall 2 rise 1"
            )
        retries = ["    retries 2", "    option redispatch"] if self.redispatch else []
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
                *retries,
                "frontend mirror",
                f"    bind 127.0.0.1:{self.port}",
                "    default_backend replicas",
                "backend replicas",
                "    balance roundrobin",
                f"    option httpchk GET {self.check_path}",
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
