"""TLS contexts: the HTTPS listener's and each upstream's client context, built from the
checked configuration (mirror/config/tls.py); TLS failures named per upstream.

The server context is built once and handed to the listening socket; a rotated pair is
loaded into that same context (mirror/web/tlsreload.py), so new connections get it while
connections in flight keep the certificate they started with (OpenSSL copies it into each
connection).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from mirror.config import ConfigError, TLSConfig, UpstreamConfig
from mirror.config.tls import load_ca, load_pair, read_pair
from mirror.observe.metrics import Metrics

# Named for the concern, as before the package split: operators filter on it.
log = logging.getLogger("mirror.tls")

_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_UNKNOWN_CA = re.compile(r"issuer|self[- ]signed|unknown ca", re.IGNORECASE)


# --- the server side ----------------------------------------------------------------------


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The HTTPS listener's context: TLS 1.2 at least, Python's default ciphers."""
    pair = read_pair(tls.cert_file, tls.key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # aiohttp's server speaks HTTP/1.1 only
    if tls.client_ca_file is not None:
        load_ca(context, "tls.client_ca_file", tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    load_pair(context, pair)
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
        load_pair(self.context, pair)
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
        load_ca(context, f"{key}.ca_file", ca_file)
    if pair is not None:
        keys = (f"{key}.client_cert_file", f"{key}.client_key_file")
        load_pair(context, read_pair(*pair, keys))
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
