"""Certificates for tests, made with the `openssl` command: a private CA and the server and
client pairs it signs (ECDSA P-256, valid for two days, for 127.0.0.1, ::1 and localhost).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.services import MirrorProcess, free_port, http_status, tcp_open

OPENSSL = "openssl"
SERVER_NAMES = ("IP:127.0.0.1", "IP:::1", "DNS:localhost")


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path

    def der(self) -> bytes:
        """The certificate in DER, as `getpeercert(binary_form=True)` returns it."""
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


class CA:
    """A private certificate authority in `directory`."""

    def __init__(self, directory: Path, name: str = "mirror test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.crt"
        self.key = self.dir / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(self.key), "-out", str(self.cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(self, name: str, *, client: bool = False, names: tuple[str, ...] = ()) -> Pair:
        """A pair for a server (127.0.0.1, ::1, localhost) or a client, signed by this CA."""
        base = self.dir / name
        csr, ext = base.with_suffix(".csr"), base.with_suffix(".ext")
        pair = Pair(base.with_suffix(".crt"), base.with_suffix(".key"))
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
        )  # fmt: skip
        usage = "clientAuth" if client else "serverAuth"
        lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
        if not client:
            lines.append("subjectAltName=" + ",".join(names or SERVER_NAMES))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        return pair


def client_context(ca: Path | None, pair: Pair | None = None) -> ssl.SSLContext:
    """A client context trusting `ca` (or nothing but it), presenting `pair` if given."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def served_certificate(
    port: int, ca: Path, pair: Pair | None = None, host: str = "127.0.0.1"
) -> bytes:
    """The DER certificate a TLS server on host:port presents to a new connection."""
    context = client_context(ca, pair)
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            cert = tls.getpeercert(binary_form=True)
    assert cert is not None
    return cert


class TLSMirror(MirrorProcess):
    """The mirror with a `tls:` section: HTTPS on `tls_port` beside plain HTTP on `port`.

    `tls` holds the section's keys (cert_file, key_file, ...); `config` any other keys."""

    def __init__(
        self,
        workdir: Path,
        upstream: str,
        ca: Path,
        tls: dict[str, Any],
        config: dict[str, Any] | None = None,
        tls_host: str = "127.0.0.1",
    ) -> None:
        super().__init__(workdir, upstream)
        self.ca = ca
        self.tls_host = tls_host
        self.tls_port = free_port()
        host = f"[{tls_host}]" if ":" in tls_host else tls_host
        self.tls_url = f"https://{host}:{self.tls_port}"
        section = {"listen": f"{host}:{self.tls_port}", "reload_interval": 0.1, **tls}
        self.config_path = self.workdir / "mirror.yml"
        self.config_path.write_text(json.dumps({**(config or {}), "tls": section}) + "\n")
        self.extra_args = ("--config", str(self.config_path))
        self.mtls = section.get("client_ca_file") is not None

    def is_ready(self) -> bool:
        if not super().is_ready():
            return False
        if self.mtls:  # the probe has no client certificate
            return tcp_open(self.tls_port, self.tls_host)
        context = client_context(self.ca)
        return http_status(f"{self.tls_url}/healthz", context=context) == 200
