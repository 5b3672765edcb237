"""The HTTPS listener's certificate reloader: polls the pair's files for as long as the app
runs and loads a changed pair into the live server context.

A new pair is read into memory and checked on a scratch context first: a bad or
mismatched pair never reaches the live context, whose old pair stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web

from mirror.config import ConfigError, TLSConfig
from mirror.config.tls import load_pair, read_pair
from mirror.observe.metrics import Metrics

# The listener's logger (mirror/net/tls.py): operators filter on it.
log = logging.getLogger("mirror.tls")


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
