"""The `tls:` section and each upstream's TLS keys, with their files read and checked.

A certificate pair is read into memory and checked on a scratch context: the listener and
its reloader (mirror/net/tls.py, mirror/web/tlsreload.py) load only pairs checked here.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config.values import (
    ConfigError,
    kind,
    optional_path,
    parse_duration,
    parse_listen,
    reject_unknown,
)

DEFAULT_TLS_LISTEN = "0.0.0.0:8443"
TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "listen", "reload_interval"}


@dataclass(frozen=True)
class TLSConfig:
    """The HTTPS listener: its certificate chain, key, optional client CA (mTLS), address."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8443
    reload_interval: float = 5.0  # how often the files are checked for a new pair


@dataclass(frozen=True)
class PemPair:
    """A certificate chain and its key, read into memory and known to match."""

    cert: bytes
    key: bytes


def parse_tls(raw: Mapping[str, Any]) -> TLSConfig | None:
    """The `tls:` section (None: plain HTTP only). Files are checked when `serve` starts."""
    sec = raw.get("tls")
    if sec is None:
        return None
    if not isinstance(sec, Mapping):
        raise ConfigError("tls", f"expected a mapping, got {kind(sec)}")
    reject_unknown(sec, TLS_KEYS, prefix="tls.")
    for key in ("cert_file", "key_file"):
        if not isinstance(sec.get(key), str):
            raise ConfigError(f"tls.{key}", f"expected a file path, got {sec.get(key)!r}")
    host, port = parse_listen("tls.listen", sec.get("listen") or DEFAULT_TLS_LISTEN)
    interval = parse_duration("tls.reload_interval", sec.get("reload_interval", 5))
    if interval <= 0:
        raise ConfigError("tls.reload_interval", f"must be positive, got {interval!r}")
    client_ca = sec.get("client_ca_file")
    return TLSConfig(
        cert_file=Path(sec["cert_file"]),
        key_file=Path(sec["key_file"]),
        client_ca_file=optional_path("tls.client_ca_file", client_ca),
        host=host,
        port=port,
        reload_interval=interval,
    )


def parse_upstream_tls(key: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream's TLS keys as `UpstreamConfig` fields, its files checked now."""
    verify = raw.get("tls_verify", True)
    if not isinstance(verify, bool):
        raise ConfigError(f"{key}.tls_verify", f"expected true or false, got {verify!r}")
    fields: dict[str, Any] = {"tls_verify": verify}
    for name in ("ca_file", "client_cert_file", "client_key_file"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key}.{name}", f"expected a file path, got {value!r}")
        fields[name] = None if value is None else Path(value)
    cert, key_file = fields["client_cert_file"], fields["client_key_file"]
    if (cert is None) != (key_file is None):
        missing = "client_key_file" if key_file is None else "client_cert_file"
        raise ConfigError(f"{key}.{missing}", "client_cert_file and client_key_file go together")
    if fields["ca_file"] is not None:
        load_ca(ssl.create_default_context(), f"{key}.ca_file", fields["ca_file"])
    if cert is not None and key_file is not None:
        read_pair(cert, key_file, (f"{key}.client_cert_file", f"{key}.client_key_file"))
    return fields


def load_ca(context: ssl.SSLContext, key: str, ca_file: Path) -> None:
    """Trust the certificates in `ca_file`; ConfigError naming `key` when it cannot."""
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key, f"cannot load {str(ca_file)!r}: {exc}") from None


def read_pair(
    cert_file: Path, key_file: Path, keys: tuple[str, str] = ("tls.cert_file", "tls.key_file")
) -> PemPair:
    """Read a PEM chain and key and check that they match; ConfigError naming the key."""
    cert, key = _read(keys[0], cert_file), _read(keys[1], key_file)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise ConfigError(keys[0], f"no PEM certificate in {str(cert_file)!r}") from None
    try:
        load_pair(probe, PemPair(cert, key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{str(key_file)!r} does not match the certificate in {keys[0]}"
        else:
            detail = f" ({exc.reason})" if exc.reason and exc.reason != "PEM lib" else ""
            message = f"{str(key_file)!r} is not a usable PEM private key{detail}"
        raise ConfigError(keys[1], message) from None
    return PemPair(cert, key)


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted private keys are not supported")


def load_pair(context: ssl.SSLContext, pair: PemPair) -> None:
    """load_cert_chain from memory: both files come from the same bytes that were checked,
    however the files on disk change meanwhile (OpenSSL only reads from paths)."""
    with _memfile(pair.cert) as cert, _memfile(pair.key) as key:
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except ValueError as exc:  # the password callback's refusal
            raise ssl.SSLError(1, str(exc)) from None


@contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    """A path that reads `data` from an anonymous in-memory file (the key never hits disk)."""
    fd = os.memfd_create("mirror-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
