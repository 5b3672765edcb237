"""The series replicas add: peer streams, leases waited on and taken over, who they are.

Every replica exports the same names; Prometheus's `instance` (or the pod's labels) tells
them apart, so a dashboard sums over replicas for the cluster and splits by instance for
each one. `mirror_cluster_replica_info` carries the configured replica id for joins.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ClusterMetrics:
    """The cluster's series, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.replica_info = Gauge(
            "mirror_cluster_replica_info",
            "1 for a replica of a cluster, labelled with its replica id (cluster.replica_id).",
            ["replica"],
            multiprocess_mode="livemax",  # workers: every one says the same
            registry=r,
        )
        self.peer_streams = Counter(
            "mirror_cluster_peer_streams",
            "Blobs streamed between replicas while one of them downloads them, by direction "
            "(out: served to another replica, in: received from the owner).",
            ["direction"],
            registry=r,
        )
        self.peer_bytes = Counter(
            "mirror_cluster_peer_bytes",
            "Bytes streamed between replicas, by direction (out, in).",
            ["direction"],
            registry=r,
        )
        self.lease_waits = Counter(
            "mirror_cluster_lease_waits",
            "Requests that found another replica holding the work's lease and followed it "
            "instead of asking the upstream, by kind (blob, manifest, tag, taglist, referrers, "
            "blobsize).",
            ["kind"],
            registry=r,
        )
        self.lease_takeovers = Counter(
            "mirror_cluster_lease_takeovers",
            "Work taken over after its lease ran out under another replica (a replica died "
            "or stalled mid-download), by kind (blob, manifest, tag, taglist, referrers, "
            "blobsize).",
            ["kind"],
            registry=r,
        )
        self.peer_refused = Counter(
            "mirror_cluster_peer_refused",
            "Requests to the internal replica endpoint refused for a missing or bad signature.",
            registry=r,
        )
        self.peer_rejected = Counter(
            "mirror_cluster_peer_rejected",
            "Streams from other replicas they refused for this replica's signature (another "
            "cluster.secret, as during a rotation, or clocks more than a minute apart); the "
            "blob is fetched here at once.",
            registry=r,
        )
        self.peer_untrusted = Counter(
            "mirror_cluster_peer_untrusted",
            "Streams from other replicas refused because their TLS certificate did not verify "
            "against cluster.ca_file (or the system's CAs); the follower then waits for the "
            "owner's lease to run out and takes the download over.",
            registry=r,
        )
        self.peer_too_large = Counter(
            "mirror_cluster_peer_blob_too_large",
            "Streams from other replicas cut or refused for going past storage.max_blob_size "
            "(a replica with a larger limit, or an owner URL in Redis that is no replica); "
            "the pull fails as an upstream's oversized blob does, and nothing is kept.",
            registry=r,
        )
        self.owners_refused = Counter(
            "mirror_cluster_owners_refused",
            "Owner URLs read from Redis and not asked: not of cluster.advertise_url's form "
            "(scheme, a port or none, path), or this replica's own held by another replica "
            "(two given one advertise_url); the blob is fetched here instead.",
            registry=r,
        )
        self.lease_unavailable = Counter(
            "mirror_cluster_lease_unavailable",
            "Work done without a lease because Redis did not answer: the replica works "
            "alone, as a single mirror does, by kind (blob, manifest, tag, taglist, "
            "referrers, blobsize).",
            ["kind"],
            registry=r,
        )
        for direction in ("out", "in"):
            self.peer_streams.labels(direction)
            self.peer_bytes.labels(direction)
        for kind in ("blob", "manifest", "tag"):
            self.lease_waits.labels(kind)
            self.lease_takeovers.labels(kind)
            self.lease_unavailable.labels(kind)
