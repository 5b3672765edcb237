"""The replica's lease client, opened and closed with the application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.cluster.lease import Leases
from mirror.cluster.locallease import LocalLeases
from mirror.metadata.topology import open_redis
from mirror.web.keys import config_key, leases_key, metrics_key, work_leases_key

log = logging.getLogger(__name__)

# Leases are one short command each; a handful of connections is plenty.
LEASE_CONNECTIONS = 16
# A Redis that does not answer must cost a request little: it then works alone.
LEASE_SOCKET_TIMEOUT = 1.0
# Under storage.path: the file locks of the host's processes (workers) without a cluster.
LOCKS_DIR = "locks"


async def leases_ctx(app: web.Application) -> AsyncIterator[None]:
    """`app[leases_key]`: a `Leases` on its own Redis connection, or None without a cluster;
    `app[work_leases_key]`: those, else file locks when workers share the cache directory."""
    config = app[config_key]
    cluster = config.cluster
    if cluster is None or config.redis.url is None:
        app[leases_key] = None
        local = LocalLeases(config.storage.path / LOCKS_DIR) if config.workers > 1 else None
        if local is not None:
            await local.sweep()  # what workers that died before this start left
        app[work_leases_key] = local
        yield
        return
    conn = open_redis(
        config.redis.url,
        LEASE_CONNECTIONS,
        decode_responses=True,
        socket_connect_timeout=LEASE_SOCKET_TIMEOUT,
        socket_timeout=LEASE_SOCKET_TIMEOUT,
    )
    leases = Leases(conn.client, cluster.advertise_url, cluster.lease_ttl, conn.turns)
    app[leases_key] = app[work_leases_key] = leases
    app[metrics_key].cluster.replica_info.labels(cluster.replica_id).set(1)
    log.info("replica %s of a cluster (lease ttl %gs)", cluster.replica_id, cluster.lease_ttl)
    try:
        yield
    finally:
        # Last of the cleanup contexts to run: what the services did not finish is over.
        released = await leases.release_all()
        if released:
            log.info("released %d leases held by work left unfinished", released)
        await conn.close()
