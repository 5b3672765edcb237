"""TLS: the HTTPS listener's context (its pair re-read when the files change) and each
upstream's client context.

The server context is built once and handed to the listening socket; a rotated pair is
loaded into that same context, so new connections get it while connections in flight keep
the certificate they started with (OpenSSL copies it into each connection). A new pair is
read into memory and checked on a scratch context first: a bad or mismatched pair never
reaches the live context, whose old pair stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# config.py imports this module inside its functions only, so this import is not circular.
from mirror.config import ConfigError, UpstreamConfig, parse_duration, parse_listen
from mirror.observe.metrics import Metrics

# Named for the concern, as before the package split: operators filter on it.
log = logging.getLogger("mirror.tls")

DEFAULT_TLS_LISTEN = "0.0.0.0:8443"
TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "listen", "reload_interval"}
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_UNKNOWN_CA = re.compile(r"issuer|self[- ]signed|unknown ca", re.IGNORECASE)


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


# --- configuration ------------------------------------------------------------------------


def parse_tls(raw: Mapping[str, Any]) -> TLSConfig | None:
    """The `tls:` section (None: plain HTTP only). Files are checked when `serve` starts."""
    sec = raw.get("tls")
    if sec is None:
        return None
    if not isinstance(sec, Mapping):
        raise ConfigError("tls", f"expected a mapping, got {sec!r}")
    for key in sec:
        if key not in TLS_KEYS:
            raise ConfigError(f"tls.{key}", "unknown key")
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
        client_ca_file=None if client_ca is None else Path(str(client_ca)),
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
    if (fields["client_cert_file"] is None) != (fields["client_key_file"] is None):
        missing = "client_key_file" if fields["client_key_file"] is None else "client_cert_file"
        raise ConfigError(f"{key}.{missing}", "client_cert_file and client_key_file go together")
    _client_context(key, fields["tls_verify"], fields["ca_file"], _client_pair(fields))
    return fields


def _client_pair(fields: Mapping[str, Any]) -> tuple[Path, Path] | None:
    cert, key = fields.get("client_cert_file"), fields.get("client_key_file")
    return None if cert is None or key is None else (cert, key)


# --- reading and checking a pair -----------------------------------------------------------


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
        _load_pair(probe, PemPair(cert, key))
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


def _load_pair(context: ssl.SSLContext, pair: PemPair) -> None:
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


# --- the server side ----------------------------------------------------------------------


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The HTTPS listener's context: TLS 1.2 at least, Python's default ciphers."""
    pair = read_pair(tls.cert_file, tls.key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # aiohttp's server speaks HTTP/1.1 only
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "tls.client_ca_file", f"cannot load {str(tls.client_ca_file)!r}: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    _load_pair(context, pair)
    return context


def _signature(paths: Sequence[Path]) -> tuple[tuple[int, ...], ...]:
    """What changes when a file is rewritten or its symlink swapped (Kubernetes Secrets)."""
    result: list[tuple[int, ...]] = []
    for path in paths:
        try:
            st = path.stat()
            result.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            result.append(())
    return tuple(result)


class CertificateReloader:
    """Polls the pair's files and loads a changed pair into the live server context."""

    def __init__(self, context: ssl.SSLContext, tls: TLSConfig, metrics: Metrics) -> None:
        self.context = context
        self.tls = tls
        self._counter = metrics.tls_reloads
        for result in ("loaded", "refused"):
            self._counter.labels(result)
        self._seen = _signature((tls.cert_file, tls.key_file))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tls.reload_interval)
            await self.check()

    async def check(self) -> bool:
        """Load the pair if its files changed since last seen; whether a new one is in use."""
        files = (self.tls.cert_file, self.tls.key_file)
        seen = await asyncio.to_thread(_signature, files)
        if seen == self._seen:
            return False
        # Remembered even when refused: one error per change, and the next change (the
        # second file of a pair written one after the other) is tried again.
        self._seen = seen
        try:
            pair = await asyncio.to_thread(read_pair, *files)
        except ConfigError as exc:
            self._counter.labels("refused").inc()
            log.error("tls: keeping the certificate in use; the new one is refused: %s", exc)
            return False
        # On the loop, so no handshake starts while the context changes; from memory only.
        _load_pair(self.context, pair)
        self._counter.labels("loaded").inc()
        log.info("tls: loaded a new certificate from %s", self.tls.cert_file)
        return True


reloader_key = web.AppKey("tls_reloader", CertificateReloader)


def enable_reload(
    app: web.Application, context: ssl.SSLContext, tls: TLSConfig, metrics: Metrics
) -> None:
    """Watch the pair's files for as long as `app` runs."""
    app[reloader_key] = CertificateReloader(context, tls, metrics)
    app.cleanup_ctx.append(_reload_ctx)


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[reloader_key].run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def is_tls(transport: asyncio.BaseTransport | None) -> bool:
    """Whether a connection is HTTPS: asyncio's sendfile over TLS copies 16 KiB per event
    loop turn (about 40 MB/s here), so senders copy in large chunks themselves instead."""
    return transport is not None and transport.get_extra_info("sslcontext") is not None


# --- the client side (upstreams) ----------------------------------------------------------


def client_contexts(upstreams: Sequence[UpstreamConfig]) -> list[ssl.SSLContext | None]:
    """Each upstream's client context (None: the default one); reads files, so run it in a
    thread. A disabled check is logged, so that it is never silent."""
    contexts = []
    for cfg in upstreams:
        if not cfg.tls_verify:
            log.warning(
                "upstream %s: tls_verify is false: its certificate is not checked", cfg.registry
            )
        pair = None
        if cfg.client_cert_file is not None and cfg.client_key_file is not None:
            pair = (cfg.client_cert_file, cfg.client_key_file)
        contexts.append(_client_context(cfg.registry, cfg.tls_verify, cfg.ca_file, pair))
    return contexts


def _client_context(
    key: str, verify: bool, ca_file: Path | None, pair: tuple[Path, Path] | None
) -> ssl.SSLContext | None:
    if verify and ca_file is None and pair is None:
        return None
    # The system's CAs stay trusted: a private registry may redirect to a public CDN.
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{key}.ca_file", f"cannot load {str(ca_file)!r}: {exc}") from None
    if pair is not None:
        keys = (f"{key}.client_cert_file", f"{key}.client_key_file")
        _load_pair(context, read_pair(*pair, keys))
    return context


def describe_failure(upstream: str, exc: BaseException) -> str | None:
    """A clear message for a TLS failure talking to `upstream`, None for other errors."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        reason = str(
            getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause
        )
        # An unknown issuer is what a private CA looks like; a wrong name or date is not.
        hint = "; give the upstream a ca_file that signs it" if _UNKNOWN_CA.search(reason) else ""
        return f"upstream {upstream}: its TLS certificate was refused ({reason}){hint}"
    if isinstance(exc, aiohttp.ClientSSLError):
        reason = getattr(exc.os_error, "reason", None) or type(exc.os_error).__name__
        return f"upstream {upstream}: TLS handshake failed ({reason})"
    if isinstance(exc, aiohttp.ClientOSError):
        # TLS 1.3: a server refusing our client certificate says so after the handshake,
        # in an alert that aiohttp re-raises as an OSError carrying OpenSSL's text.
        match = _SSL_REASON.search(str(exc))
        if match:
            reason = match.group(1)
            hint = "; does it need client_cert_file?" if "CERTIFICATE" in reason else ""
            return f"upstream {upstream}: TLS failed ({reason}){hint}"
    return None
