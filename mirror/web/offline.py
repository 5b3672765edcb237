"""The app's services without a listening socket: what warm, ls, gc and verify work with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from mirror.cache.downloads import Downloads
from mirror.cache.eviction import Evictor
from mirror.cache.holdings import Holdings
from mirror.cache.manifests import ManifestService
from mirror.config import Config
from mirror.metadata.store import MetadataStore
from mirror.storage import CacheStore
from mirror.upstream.routing import Upstreams
from mirror.web.app import create_app
from mirror.web.keys import (
    downloads_key,
    evictor_key,
    holdings_key,
    manifests_key,
    metadata_key,
    storage_key,
    upstreams_key,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """The services `serve` would use, on the same storage, metadata and upstreams."""

    storage: CacheStore
    downloads: Downloads
    manifests: ManifestService
    metadata: MetadataStore
    upstreams: Upstreams
    evictor: Evictor
    holdings: Holdings


async def with_services(config: Config, run: Callable[[Services], Awaitable[T]]) -> T:
    """Start the app's resources (no listening socket), run, and clean up."""
    app = create_app(config)
    # A serve may be running on the same directory: its downloads' temp files stay.
    app[storage_key].offline = True
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        services = Services(
            app[storage_key], app[downloads_key], app[manifests_key], app[metadata_key],
            app[upstreams_key], app[evictor_key], app[holdings_key],
        )  # fmt: skip
        return await run(services)
    finally:
        await runner.cleanup()
