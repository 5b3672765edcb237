"""The application factory: one resource per cleanup context, the middleware, the access log."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.log import access_logger

from mirror.access.policy import compile_policy
from mirror.cache.blobsizes import BlobSizes
from mirror.cache.downloads import Downloads
from mirror.cache.eviction import Evictor
from mirror.cache.holdings import Holdings
from mirror.cache.manifests import ManifestService
from mirror.cache.referrers import ReferrersService
from mirror.cache.taglists import TagListService
from mirror.cluster.blobflight import BlobFlight
from mirror.cluster.bucketshare import BucketShare
from mirror.cluster.peers import PEER_PATH
from mirror.cluster.shared import SharedWork
from mirror.cluster.tokenshare import SharedTokens
from mirror.config import Config, UpstreamConfig
from mirror.metadata.fallback import open_metadata
from mirror.metadata.memory import MemoryMetadata
from mirror.metadata.store import TokenStore
from mirror.net.proxies import TrustedProxies
from mirror.net.tls import client_contexts
from mirror.observe.logs import FailureLog
from mirror.observe.metrics import Metrics
from mirror.observe.workerfiles import publish_pulls
from mirror.oci.reference import parse_digest
from mirror.storage import CacheStore, new_store
from mirror.storage.hostshare import HostShare
from mirror.storage.localflight import LocalFlight
from mirror.storage.sharing import BucketSharing
from mirror.storage.tally import SharedTally
from mirror.upstream.client import Upstream, new_session
from mirror.upstream.credentials import Credentials
from mirror.upstream.probe import probe_open_circuits
from mirror.upstream.routing import Upstreams
from mirror.upstream.tokens import TokenCache
from mirror.web.access import client_auth_ctx, token_handler
from mirror.web.accesslog import AccessLogger
from mirror.web.blobs import BlobService
from mirror.web.drain import Drain
from mirror.web.forwarded import ProxyTrust, proxy_trust_key
from mirror.web.gate import PullGate, gate_key
from mirror.web.keys import (
    blobs_key,
    config_key,
    downloads_key,
    drain_key,
    evictor_key,
    failures_key,
    holdings_key,
    leases_key,
    manifests_key,
    metadata_key,
    metrics_key,
    peers_key,
    policy_key,
    pulls_key,
    referrers_key,
    storage_key,
    taglists_key,
    upstreams_key,
    work_leases_key,
)
from mirror.web.leases import leases_ctx
from mirror.web.middleware import RequestSeries, registry_middleware, series_key
from mirror.web.peer import peer_blob, peers_ctx
from mirror.web.routes import expect, setup_routes
from mirror.web.status import PUBLISH_SECONDS, PullCounter

log = logging.getLogger(__name__)

DISK_WATCH_INTERVAL = 30.0
# In-process metadata is written here (under storage.path) so that it survives restarts.
METADATA_SNAPSHOT = "metadata.json"
# ... or, when workers share the directory and there is no Redis, kept here by all of them.
METADATA_DB = "metadata.sqlite"
SNAPSHOT_INTERVAL = 30.0
# The eviction's count and turn, shared by the workers on the directory (storage/tally.py).
EVICTION_DIR = "eviction"


def create_app(config: Config) -> web.Application:
    """A mirror application for `config`; resources open when it starts."""
    # The access logger is the app's own, whichever runner serves it: it writes the audit.
    app = web.Application(
        middlewares=[registry_middleware],
        handler_args={"access_log_class": AccessLogger, "access_log": access_logger},
    )
    app[config_key] = config
    app[policy_key] = None if config.policy is None else compile_policy(config.policy)
    app[metrics_key] = Metrics()
    app[series_key] = RequestSeries(app[metrics_key])
    proxies = TrustedProxies(config.trusted_proxies)
    app[proxy_trust_key] = ProxyTrust(proxies, app[metrics_key].forwarded_ignored)
    app[failures_key] = FailureLog(logging.getLogger("mirror.upstream"))
    app[storage_key] = new_store(config.storage, app[metrics_key], _bucket_sharing(app, config))
    app[storage_key].shared = config.workers > 1
    app[pulls_key] = PullCounter(shared=app[metrics_key].worker_files)
    app[drain_key] = Drain()
    app.cleanup_ctx.extend([storage_ctx, metadata_ctx, upstream_ctx, services_ctx, client_auth_ctx])
    if app[pulls_key].shared is not None:
        app.cleanup_ctx.append(pulls_ctx)
    app.cleanup_ctx.insert(0, leases_ctx)  # first: every service may take leases
    app.cleanup_ctx.insert(1, peers_ctx)  # downloads stream from other replicas with it
    setup_routes(app)
    if config.auth.htpasswd is not None:
        app.router.add_get("/token", token_handler, name="token", expect_handler=expect)
    if config.cluster is not None:  # blobs for other replicas, signed requests only
        app.router.add_get(PEER_PATH, peer_blob, name="peer_blob", expect_handler=expect)
    return app


def _bucket_sharing(app: web.Application, config: Config) -> BucketSharing | None:
    """Who else does the bucket's chores (eviction, clean-up) and reads from it: replicas,
    told by their leases (there once started); the workers on one directory, by file
    locks in it; else nobody."""
    if config.cluster is not None:
        return BucketShare(lambda: app.get(leases_key))
    if config.workers > 1:
        return HostShare(config.storage.path)
    return None


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    storage = app[storage_key]
    gauge = app[metrics_key].storage_writable
    storage.on_writable_change = lambda writable: gauge.set(int(writable))
    gauge.set(1)
    await storage.open()
    watcher = asyncio.create_task(watch_disk(storage, app[metrics_key]))
    yield
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await storage.close()


async def watch_disk(storage: CacheStore, metrics: Metrics) -> None:
    """Keep the disk-space gauges current (for the nearly-full alert), and the writable
    flag: a cold pull re-probes a directory that refused writes, but a mirror serving only
    cached blobs meanwhile would report it unwritable (a critical alert) for good."""
    while True:
        try:
            free, total = await storage.disk_space()
            metrics.storage_free.set(free)
            metrics.storage_capacity.set(total)
            await storage.writable_now()
        except OSError:
            pass  # the directory may be gone or unmounted; /readyz says so
        await asyncio.sleep(DISK_WATCH_INTERVAL)


async def metadata_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    gauge = app[metrics_key].metadata_up
    gauge.set(1)
    metadata = open_metadata(
        config.redis.url,
        config.cache.tag_ttl,
        config.cache.stale_if_error,
        on_change=lambda up: gauge.set(int(up)),
        snapshot=config.storage.path / METADATA_SNAPSHOT,
        shared=config.storage.path / METADATA_DB if config.workers > 1 else None,
    )
    app[metadata_key] = metadata
    saver = None
    if isinstance(metadata, MemoryMetadata):
        await metadata.load()
        saver = asyncio.create_task(save_periodically(metadata))
    try:
        await metadata.ping()
    except Exception as exc:  # start anyway: /readyz reports it, requests retry
        log.warning("metadata store not reachable at start: %s", type(exc).__name__)
    yield
    if saver is not None:
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)
    await metadata.close()


async def pulls_ctx(app: web.Application) -> AsyncIterator[None]:
    """A worker's pulls per repository published for the other workers' status pages,
    every PUBLISH_SECONDS when they changed, and once more at the end (the supervisor
    folds the file of a worker gone)."""
    pulls = app[pulls_key]

    async def publish() -> None:
        counts = pulls.changed()
        if counts is not None and pulls.shared is not None:
            try:
                await asyncio.to_thread(publish_pulls, pulls.shared, counts)
            except OSError as exc:
                log.warning("pulls per repository not published: %s", exc.strerror)

    async def publish_periodically() -> None:
        while True:
            await asyncio.sleep(PUBLISH_SECONDS)
            await publish()

    publisher = asyncio.create_task(publish_periodically())
    yield
    publisher.cancel()
    await asyncio.gather(publisher, return_exceptions=True)
    await publish()


async def save_periodically(metadata: MemoryMetadata) -> None:
    while True:
        await asyncio.sleep(SNAPSHOT_INTERVAL)
        await metadata.save()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[config_key]
    every = (config.upstream, *config.upstreams)
    # Each upstream has its own session, so its own connection pool: an upstream that
    # holds every connection it is given open delays no other upstream's pulls. Token
    # services (other hosts again) share one more.
    token_session = new_session(config.upstream.connect_timeout, config.upstream.read_timeout)
    sessions = [new_session(cfg.connect_timeout, cfg.read_timeout) for cfg in every]
    # Redirects to other origins go on sessions that connect to public addresses only.
    publics = [
        new_session(cfg.connect_timeout, cfg.read_timeout, public_only=True) for cfg in every
    ]
    try:
        tokens = TokenCache(token_session, app[metrics_key], _token_share(app))
        contexts = await asyncio.to_thread(client_contexts, every)  # reads CA and key files
        built = [
            build_upstream(
                cfg,
                pair,
                tokens,
                app[metrics_key],
                config.cache.negative_ttl,
                ctx,
                max_blob_size=config.storage.max_blob_size,
            )
            for cfg, pair, ctx in zip(
                every, zip(sessions, publics, strict=True), contexts, strict=True
            )
        ]
        app[upstreams_key] = Upstreams(built[0], built[1:])
        # Client auth (an htpasswd) means users may log in: a client without credentials
        # refused what users may pull is challenged for a login rather than refused.
        challenges = config.auth.htpasswd is not None
        app[gate_key] = PullGate(app[policy_key], app[upstreams_key], challenges=challenges)
        prober = asyncio.create_task(probe_open_circuits(built))
        try:
            yield
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        await tokens.close()
    finally:
        await asyncio.gather(*(session.close() for session in (token_session, *sessions, *publics)))


def _token_share(app: web.Application) -> SharedTokens | None:
    """Workers share the tokens they fetch (through the metadata store), one fetch each."""
    metadata = app[metadata_key]
    if app[config_key].workers == 1 or not isinstance(metadata, TokenStore):
        return None
    return SharedTokens(metadata, SharedWork(app[work_leases_key], app[metrics_key].cluster))


def build_upstream(
    cfg: UpstreamConfig,
    sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession],
    tokens: TokenCache,
    metrics: Metrics,
    negative_ttl: float,
    ssl_context: ssl.SSLContext | None = None,
    max_blob_size: int | None = None,
) -> Upstream:
    credentials = None
    if cfg.username:
        credentials = Credentials(
            cfg.username, cfg.password, cfg.password_command, cfg.password_refresh, cfg.registry
        )
    session, public_session = sessions  # its own host's, and public addresses only
    return Upstream(
        cfg.url,
        session,
        tokens,
        metrics,
        cfg.registry,
        credentials,
        negative_ttl=negative_ttl,
        tag_ttl=cfg.tag_ttl,
        timeouts=(cfg.connect_timeout, cfg.read_timeout),
        ssl_context=ssl_context,
        public_session=public_session,
        realm_hosts=cfg.realm_hosts,
        redirect_hosts=cfg.redirect_hosts,
        max_blob_size=max_blob_size,
    )


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics, storage, config = app[metrics_key], app[storage_key], app[config_key]
    leases, peers = app[leases_key], app[peers_key]
    flight = None if leases is None or peers is None else BlobFlight(leases, peers, metrics.cluster)
    local = LocalFlight(storage.tmp) if config.workers > 1 else None
    downloads = Downloads(storage, metrics, flight, local, app[failures_key])
    holdings = Holdings(app[metadata_key], metrics, one_upstream=not config.upstreams)
    downloads.on_sent = lambda upstream, digest: holdings.record_sent(upstream, [str(digest)])
    app[holdings_key] = holdings
    manifests = ManifestService(
        storage,
        app[metadata_key],
        metrics,
        config.cache,
        holdings,
        app[work_leases_key],
        app[failures_key],
    )
    app[manifests_key] = manifests
    sizes = BlobSizes(manifests)
    holdings.head_blob = lambda up, repo, digest: sizes.size(up, repo, parse_digest(digest))
    blobs = BlobService(storage, downloads, metrics, holdings, sizes)
    app[downloads_key] = downloads
    app[blobs_key] = blobs
    referrers = ReferrersService(manifests, metrics)
    app[referrers_key] = referrers
    taglists = TagListService(manifests, metrics)
    app[taglists_key] = taglists
    # Workers: one count of the directory and one pass at a time among them.
    tally = SharedTally(storage.root / EVICTION_DIR) if storage.shared else None
    evictor = Evictor(
        storage,
        metrics,
        config.storage.max_size,
        config.storage.max_idle,
        lambda: blobs.reading,
        tally,
    )
    app[evictor_key] = evictor
    downloads.on_commit = storage.on_landed = evictor.added
    downloads.on_no_room = evictor.make_room
    storage.on_emptied = evictor.recount_soon
    manifests.on_stored = evictor.stored
    size, count = await evictor.start(storage.usage)
    log.info("cache at %s holds %d objects, %d bytes", storage.root, count, size)
    await storage.attach(app[metadata_key], lambda: blobs.reading)
    task = asyncio.create_task(evictor.run()) if evictor.enabled else None
    yield
    metrics.turn_counts.flush()  # the last turn's counts, before a worker's files close
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await manifests.close()
    await taglists.close()
    await holdings.close()
    await referrers.close()
    await sizes.close()
    await downloads.close()
    await evictor.close()  # after the downloads: their last blobs are counted
