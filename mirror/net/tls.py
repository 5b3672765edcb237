"""TLS contexts: the HTTPS listener's and each upstream's client context, built from the
checked configuration (mirror/config/tls.py); TLS failures named per upstream.

The server context is built once and handed to the listener's guard; a rotated pair is
loaded into that same context (mirror/web/tlsreload.py), so new connections get it while
connections in flight keep the certificate they started with (OpenSSL copies it into each
connection).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import re
import ssl
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from mirror.config import TLSConfig, UpstreamConfig
from mirror.config.tls import load_ca, load_pair, read_pair

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


def is_tls(transport: asyncio.BaseTransport | None) -> bool:
    """Whether a connection is HTTPS: its bytes must pass through the transport to be
    encrypted, so no sendfile to its socket (mirror/net/sendfile.py); senders copy in large
    chunks (asyncio's own TLS fallback copies 16 KiB per event loop turn, about 40 MB/s)."""
    return transport is not None and transport.get_extra_info("sslcontext") is not None


def server_tls(
    loop: asyncio.AbstractEventLoop,
    app: asyncio.Protocol,
    context: ssl.SSLContext,
    shaken: asyncio.Future[None],
    handshake_timeout: float,
) -> asyncio.BufferedProtocol:
    """The loop's own TLS protocol for a connection accepted without ssl=, the one
    create_server(ssl=) would have put there (the same code moves the bytes): `app` gets
    connection_made once the handshake is done, `shaken` its end either way. Not
    loop.start_tls, whose protocol takes over a loop turn later: uvloop has read the
    client's hello by then."""
    kind: type[asyncio.BufferedProtocol] = asyncio.sslproto.SSLProtocol
    if type(loop).__module__.partition(".")[0] == "uvloop":
        # uvloop's loop, so uvloop is loaded: imported here, never by a process that
        # runs on asyncio's (`event_loop: asyncio` means it is never loaded at all).
        import uvloop.loop  # noqa: PLC0415

        kind = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # no stub; same signature
    return kind(  # type: ignore[call-arg]
        loop, app, context, shaken, server_side=True, ssl_handshake_timeout=handshake_timeout
    )


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
        keys = (f"{cfg.registry}.ca_file", f"{cfg.registry}.client_cert_file",
                f"{cfg.registry}.client_key_file")  # fmt: skip
        contexts.append(_client_context(keys, cfg.tls_verify, cfg.ca_file, pair))
    return contexts


def _client_context(
    keys: tuple[str, str, str], verify: bool, ca_file: Path | None, pair: tuple[Path, Path] | None
) -> ssl.SSLContext | None:
    """`keys`: the settings of the CA file and the pair, named when one will not load."""
    if verify and ca_file is None and pair is None:
        return None
    # The system's CAs stay trusted: a private registry may redirect to a public CDN.
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if ca_file is not None:
        load_ca(context, keys[0], ca_file)
    if pair is not None:
        load_pair(context, read_pair(*pair, (keys[1], keys[2])))
    return context


def peer_context(ca_file: Path | None, pair: tuple[Path, Path] | None) -> ssl.SSLContext | None:
    """The context replicas reach each other's HTTPS listeners with: the system's CAs and
    `cluster.ca_file`, the hostname checked, and `cluster.cert_file`/`key_file` presented
    where given; None (aiohttp's default, verifying) without either. Reads files: run it in
    a thread."""
    keys = ("cluster.ca_file", "cluster.cert_file", "cluster.key_file")
    return _client_context(keys, True, ca_file, pair)


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
