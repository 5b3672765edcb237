"""Typed keys for what `create_app` puts on the application, in one place."""

from __future__ import annotations

from aiohttp import web

from mirror.access.policy import Policy
from mirror.cache.downloads import Downloads
from mirror.cache.eviction import Evictor
from mirror.cache.holdings import Holdings
from mirror.cache.manifests import ManifestService
from mirror.cache.referrers import ReferrersService
from mirror.cache.taglists import TagListService
from mirror.cluster.lease import HeldLease, Leases, LeaseSource
from mirror.cluster.peers import PeerClient
from mirror.config import Config
from mirror.metadata.store import MetadataStore
from mirror.observe.logs import FailureLog
from mirror.observe.metrics import Metrics
from mirror.storage import CacheStore
from mirror.upstream.routing import Upstreams
from mirror.web.blobs import BlobService
from mirror.web.drain import Drain
from mirror.web.status import PullCounter

config_key = web.AppKey("config", Config)
metrics_key = web.AppKey("metrics", Metrics)
# Upstream failures clients saw, logged once each and rate-limited (observe/logs.py).
failures_key = web.AppKey("failures", FailureLog)
storage_key: web.AppKey[CacheStore] = web.AppKey("storage")
metadata_key: web.AppKey[MetadataStore] = web.AppKey("metadata")
upstreams_key = web.AppKey("upstreams", Upstreams)
# The pull policy compiled from config.policy once, by create_app; None: pull anything.
policy_key: web.AppKey[Policy | None] = web.AppKey("policy")
downloads_key = web.AppKey("downloads", Downloads)
blobs_key = web.AppKey("blobs", BlobService)
# Which digests each repository holds: what may be served under it (cache/holdings.py).
holdings_key = web.AppKey("holdings", Holdings)
evictor_key = web.AppKey("evictor", Evictor)
pulls_key = web.AppKey("pulls", PullCounter)
manifests_key = web.AppKey("manifests", ManifestService)
referrers_key = web.AppKey("referrers", ReferrersService)
taglists_key = web.AppKey("taglists", TagListService)
# The replica's leases in Redis (mirror/cluster/); None when `cluster:` is not set.
leases_key: web.AppKey[Leases | None] = web.AppKey("leases")
# The leases work once-for-all takes (tags, tokens): the replicas' (Redis), else, with
# workers, the host's processes' (file locks), else None.
work_leases_key: web.AppKey[LeaseSource[HeldLease] | None] = web.AppKey("work_leases")
# The client replicas stream blobs from each other with; None without `cluster:`.
peers_key: web.AppKey[PeerClient | None] = web.AppKey("peers")
# Set on SIGTERM (web/server.py): /readyz answers 503 while the replica drains.
drain_key = web.AppKey("drain", Drain)
