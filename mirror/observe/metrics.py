"""Prometheus metrics, on the app's own registry so that tests never share series.

Label values are route templates, methods, statuses, upstream hosts and fixed words: never
repository names, tags or anything a client chooses freely (cardinality), and never secrets.

With `workers: N` every worker process writes its values to files in the directory its
supervisor names (PROMETHEUS_MULTIPROC_DIR) and /metrics reads them all: counters and
histograms add up; a gauge says how: `livesum` where each worker holds its share (connections,
downloads), `livemostrecent` or `livemax` where every worker sees the same disk, upstream or
Redis (a dead worker's gauges are dropped). The cache's size and objects are set, never
added to, from the count the workers keep together (storage/tally.py: the last eviction
pass, every worker's writes since), so the most recent value is the whole directory's:
close, not exact, between passes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mirror.observe.cluster_metrics import ClusterMetrics
from mirror.observe.guard_metrics import GuardMetrics
from mirror.observe.upstream_guard_metrics import UpstreamGuardMetrics
from mirror.observe.workerfiles import OnlyNamed, WorkerFilesCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
M = TypeVar("M", Counter, Gauge, Histogram)


# Set by the supervisor for its workers; prometheus-client reads it when first imported.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Served on the monitoring listener (metrics.listen) alone, not on a client listener's
# /metrics: a holdings refusal is a digest cached for another repository, which a client
# would tell there from a digest never pulled (both are a cache miss, then the upstream's
# 404, asked or remembered, in every series it reads).
MONITOR_ONLY = frozenset({"mirror_holdings_checks"})


class Metrics:
    """Every series the mirror exports."""

    def __init__(self) -> None:
        self._declare()
        self._declare_s3()
        self._zero_known_labels()
        self.cluster = ClusterMetrics(self.registry)  # replicas' series (mirror/cluster/)
        self.guard = GuardMetrics(self.registry)  # refusals by the mirror's own limits
        self.upstream_guard = UpstreamGuardMetrics(self.registry)  # refusals of upstream content
        self.turn_counts = TurnCounts()  # the series counted on every request
        self.exposed = self.registry  # what /metrics serves
        files = os.environ.get(MULTIPROCESS_ENV)
        # A worker's: the directory of every worker's files (observe/workerfiles.py).
        self.worker_files = Path(files) if files else None
        if self.worker_files is not None:  # every worker's values, summed (the dead's too)
            self.exposed = CollectorRegistry()
            self.exposed.register(WorkerFilesCollector(self.worker_files))

    def exposed_only(self, names: list[str]) -> Collector:
        """What /metrics?name[]=… serves: the samples of those names."""
        if self.exposed is self.registry:  # one process: only the collectors named
            return self.registry.restricted_registry(names)
        return OnlyNamed(self.exposed, names)

    @staticmethod
    def for_clients(served: Collector) -> Collector:
        """What a client listener's /metrics serves of `served`: all but MONITOR_ONLY."""
        return Without(served, MONITOR_ONLY)

    def count_worker_start(self, restarted: bool) -> None:
        """A worker's share of `mirror_worker_restarts_total`: 1 when it replaced a worker
        that died. Workers alone have the series; the files of dead ones keep theirs."""
        restarts = Counter(
            "mirror_worker_restarts",
            "Worker processes started again after one died (workers > 1).",
            registry=self.registry,
        )
        if restarted:
            restarts.inc()

    def _zero_known_labels(self) -> None:
        """Create the series with fixed label values at 0, so dashboards show 0 rather
        than "no data", and `increase()` sees the first event after a restart."""
        for kind in ("manifest", "tag", "blob"):
            for result in ("hit", "miss"):
                self.cache_requests.labels(kind, result)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for kind in ("blob", "manifest"):
            self.digest_mismatches.labels(kind)
        self.stale_served.labels("tag")
        for reason in ("unavailable", "rate_limited", "unauthorized", "denied", "invalid"):
            self.stale_reasons.labels(reason)
        for reason in ("size", "idle"):
            self.evictions.labels(reason)
        for result in ("unchanged", "changed", "error"):
            self.revalidations.labels(result)
        for kind in ("blob", "manifest"):
            for result in ("confirmed", "refused"):
                self.holdings_checks.labels(kind, result)

    def _declare(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "mirror_http_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mirror_http_request_duration_seconds",
            "Time to answer a request (headers sent for streamed bodies), by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "mirror_cache_requests",
            "Cache look-ups by kind (manifest, tag, blob) and result (hit: answered from "
            "local bytes, a verified download not yet renamed included; miss).",
            ["kind", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes",
            "Body bytes sent to clients, by source (cache, upstream).",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests made to an upstream, by upstream, kind and status (or error).",
            ["upstream", "kind", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mirror_upstream_request_duration_seconds",
            "Upstream time to response headers, by upstream and kind.",
            ["upstream", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_fetches_in_flight = Gauge(
            "mirror_upstream_fetches_in_flight",
            "Blob downloads from upstream under way.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.joined_requests = Counter(
            "mirror_joined_requests",
            "Blob requests served from a download already under way instead of a new fetch.",
            registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes",
            "Blob bytes received from upstreams.",
            ["upstream"],
            registry=r,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches",
            "Upstream content whose hash did not match its digest (never cached).",
            ["kind"],
            registry=r,
        )
        self.cache_size = Gauge(
            "mirror_cache_size_bytes",
            "Bytes of blobs and manifests stored on disk.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.cache_objects = Gauge(
            "mirror_cache_objects",
            "Blobs and manifests stored on disk.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window, from its ratelimit-remaining header.",
            ["upstream"],
            # The upstream's word, whichever worker heard it last: a dead one's too (its
            # file is folded, not dropped), or the budget would vanish with it.
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "Pulls allowed in the upstream's window, from its ratelimit-limit header.",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.revalidations = Counter(
            "mirror_tag_revalidations",
            "Expired tags checked upstream with HEAD, by result (unchanged, changed, error).",
            ["result"],
            registry=r,
        )
        self.stale_served = Counter(
            "mirror_stale_served",
            "Answers served from cache past their TTL because the upstream failed, by kind.",
            ["kind"],
            registry=r,
        )
        self.stale_reasons = Counter(
            "mirror_stale_tag_reasons",
            "Expired tags served stale, by what the upstream did: unavailable, rate_limited, "
            "unauthorized or denied (the mirror's credentials refused), invalid (no manifest).",
            ["reason"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "mirror_upstream_up",
            "1 while the upstream answers, 0 while its circuit breaker is open.",
            ["upstream"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.negative_hits = Counter(
            "mirror_negative_cache_hits",
            "Requests answered 404 from the remembered upstream 404, without asking it.",
            registry=r,
        )
        self.holdings_checks = Counter(
            "mirror_holdings_checks",
            "Content asked for under a repository not known to hold it, by kind (blob, "
            "manifest) and result: confirmed by the upstream under that repository, or "
            "refused (its 404, asked or remembered) without a byte of the cache.",
            ["kind", "result"],
            registry=r,
        )
        self.resumed_transfers = Counter(
            "mirror_resumed_transfers",
            "Upstream blob transfers cut mid-way and resumed with a Range request.",
            registry=r,
        )
        self.evictions = Counter(
            "mirror_evictions",
            "Blobs evicted from the cache to stay within its bounds, by reason (size, idle).",
            ["reason"],
            registry=r,
        )
        self.eviction_passes = Counter(
            "mirror_eviction_passes",
            "Eviction passes over the cache directory, each a scan of it (with workers, one "
            "process's at a time).",
            registry=r,
        )
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes",
            "Bytes of blobs evicted from the cache.",
            registry=r,
        )
        self.cache_max_size = Gauge(
            "mirror_cache_max_size_bytes",
            "The configured bound on the cache's size (storage.max_size); 0 when unbounded.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.storage_free = Gauge(
            "mirror_storage_free_bytes",
            "Bytes free on the filesystem holding the cache.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.storage_capacity = Gauge(
            "mirror_storage_capacity_bytes",
            "Size of the filesystem holding the cache.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.storage_writable = Gauge(
            "mirror_storage_writable",
            "1 while the cache directory takes writes; 0 while full or read-only.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.metadata_up = Gauge(
            "mirror_metadata_up",
            "1 while the metadata store (Redis) answers; 0 while requests fall back to memory.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.token_fetches = Counter(
            "mirror_upstream_token_fetches",
            "Tokens fetched from an upstream's token service, by upstream and status.",
            ["upstream", "status"],
            registry=r,
        )
        self.pulls_denied = Counter(
            "mirror_pulls_denied",
            "Requests refused by the pull policy, by upstream and reason (deny_list: a deny "
            "glob, allow_list: no allow glob, no_rule: no auth.rules entry).",
            ["upstream", "reason"],
            registry=r,
        )
        # Attacks and misconfigurations show here: forged or stale tokens, guessed passwords.
        self.client_auth_refused = Counter(
            "mirror_client_auth_refused",
            "Client credentials refused, by reason (password: Basic; expired, not_yet_valid, "
            "audience, signature, algorithm, noncanonical, malformed: bearer tokens).",
            ["reason"],
            registry=r,
        )
        # Headers ignored: a client forging its address, or a proxy left out of the config.
        self.forwarded_ignored = Counter(
            "mirror_forwarded_headers_ignored",
            "Requests with X-Forwarded-For/-Proto/-Host from a peer not in trusted_proxies.",
            registry=r,
        )
        # An upstream sending the mirror elsewhere: refused, never asked (destinations.py).
        self.redirects_refused = Counter(
            "mirror_upstream_redirects_refused",
            "Upstream redirects refused: plain HTTP from HTTPS, or a host neither the "
            "upstream's own, nor listed in redirect_hosts, nor on public addresses; by upstream.",
            ["upstream"],
            registry=r,
        )
        self.realms_refused = Counter(
            "mirror_upstream_realms_refused",
            "Upstream token realms refused: plain HTTP for an HTTPS upstream, or a host "
            "neither the upstream's own nor listed in auth_hosts; by upstream.",
            ["upstream"],
            registry=r,
        )
        # Alert on "refused": a renewed certificate that the HTTPS listener could not use.
        self.tls_reloads = Counter(
            "mirror_tls_reloads",
            "Changed TLS pairs the HTTPS listener saw, by result (loaded, refused).",
            ["result"],
            registry=r,
        )

    def _declare_s3(self) -> None:
        """The bucket behind the local directory (storage.s3); the tiers' hits."""
        r = self.registry
        self.tier_hits = Counter(
            "mirror_tier_hits",
            "Blob requests answered from stored content, by tier (local: the directory; "
            "bucket: the S3 bucket, redirects included).",
            ["tier"],
            registry=r,
        )
        for tier in ("local", "bucket"):
            self.tier_hits.labels(tier)
        self.s3_requests = Counter(
            "mirror_s3_requests",
            "Requests made to the S3 bucket, by operation and status (or error).",
            ["operation", "status"],
            registry=r,
        )
        self.s3_duration = Histogram(
            "mirror_s3_request_duration_seconds",
            "S3 time to response headers (retries included), by operation.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.s3_bytes = Counter(
            "mirror_s3_bytes",
            "Body bytes moved to and from the S3 bucket, by direction (sent, received).",
            ["direction"],
            registry=r,
        )
        for direction in ("sent", "received"):
            self.s3_bytes.labels(direction)
        self.s3_up = Gauge(
            "mirror_s3_up",
            "1 while the S3 bucket answers; 0 while blobs are served from the local tier "
            "and upstream, uncached.",
            multiprocess_mode="livemostrecent",
            registry=None,  # registered by storage.s3.Bucket: a mirror without S3 has none
        )
        self.redirects = Counter(
            "mirror_blob_redirects",
            "Blob GETs answered 307 to a presigned URL of the bucket.",
            registry=r,
        )
        self.bucket_evictions = Counter(
            "mirror_bucket_evictions",
            "Blobs deleted from the bucket to stay within storage.s3.max_size.",
            registry=r,
        )


class Without(Collector):
    """The metric families of `collector` but those named (without `_total`)."""

    def __init__(self, collector: Collector, names: frozenset[str]) -> None:
        self._collector = collector
        self._names = names

    def collect(self) -> Iterable[Metric]:
        return (family for family in self._collector.collect() if family.name not in self._names)


class Children(Generic[M]):
    """A labelled metric's series by label values, looked up once: `labels()` checks its
    values and takes a lock on every call, too dear for the series of every request. Past
    `limit` distinct values (a client's method names them) the look-ups stay uncached."""

    def __init__(self, metric: M, limit: int = 1000) -> None:
        self._metric: M = metric
        self._limit = limit
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._limit:
                self._children[values] = child
        return child


class TurnCounts:
    """Counter series counted on every request, added to once at the end of the event
    loop's turn: `inc` here is a dict update, where prometheus-client's takes a lock (and
    with workers writes the shared file), and under load a turn answers dozens of requests.
    A scrape sees a count one turn late at most."""

    def __init__(self) -> None:
        self._counts: dict[Counter, int] = {}

    def inc(self, series: Counter) -> None:
        counts = self._counts
        if not counts:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop here: at once
                series.inc()
                return
        counts[series] = counts.get(series, 0) + 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for series, count in counts.items():
            series.inc(count)
