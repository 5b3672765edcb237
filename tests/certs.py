"""Certificates for tests, made with the `openssl` command: a private CA and the server and
client pairs it signs (ECDSA P-256, valid for two days, for 127.0.0.1, ::1 and localhost).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
