"""nginx serving one directory with sendfile: the limit the mirror's warm blobs are held to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

from tests.services import Service, free_port, http_status

NGINX = "/usr/sbin/nginx"


class NginxServer(Service):
    """A foreground nginx, one worker, serving `root` on a free port of 127.0.0.1."""

    name = "nginx"

    def __init__(self, workdir: Path | str, root: Path) -> None:
        super().__init__(workdir)
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "nginx.conf"

    def config_text(self) -> str:
        # As root the worker would run as nobody, who cannot enter a private temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return user + (
            "daemon off;\n"
            "worker_processes 1;\n"
            f"pid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'};\n"
            "events {}\n"
            "http {\n"
            "  sendfile on;\n"
            "  access_log off;\n"
            f"  client_body_temp_path {self.workdir / 'tmp'};\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }}\n"
            "}\n"
        )

    def start(self) -> Self:
        self.config_path.write_text(self.config_text())
        return super().start()

    def command(self) -> list[str]:
        return [NGINX, "-c", str(self.config_path), "-p", str(self.workdir)]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/") is not None
