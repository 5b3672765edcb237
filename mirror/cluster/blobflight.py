"""One upstream fetch per blob across replicas: where a download's bytes come from.

A download asks `source` before it opens a body (and again whenever a body breaks):

    lease `blob:<digest>` ours      → the upstream, and this replica uploads to the bucket
                                      (it took over if it was following: counted)
    held by another replica (owner) → the owner's internal endpoint, from the byte reached
                                      (peers.py); the owner gone but its lease not yet run
                                      out → ask again shortly, until one answers or the
                                      lease is ours; the owner found the blob unknown
                                      upstream → BlobUnknown here too
    Redis does not answer           → the upstream, alone, as a single mirror does

Only the lease holder (or a replica working alone) asks the upstream, so the bytes are
fetched once whichever replicas the clients reach; the others stream them as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mirror.cluster.lease import Lease, LeaseBackoff, Leases
from mirror.cluster.peers import PeerClient, PeerRefused, PeerUnavailable
from mirror.observe.cluster_metrics import ClusterMetrics
from mirror.oci.errors import BlobUnknown
from mirror.oci.reference import Digest
from mirror.upstream.body import BlobBody

log = logging.getLogger(__name__)

KIND = "blob"
# An owner that does not answer is asked again after this, doubling up to a quarter TTL:
# its lease runs out within one TTL of its death, and then this replica takes it.
RETRY_FIRST = 0.05
# An owner that keeps its lease but never answers (replicas cut off from each other, not
# from Redis) is waited for this many TTLs at most; then this replica fetches alone.
PATIENCE_TTLS = 3
MIN_PATIENCE = 30.0


@dataclass(frozen=True)
class Following:
    """The owner's body from the byte asked for."""

    owner: str
    body: BlobBody


class BlobFlight:
    """Chooses each download's source; see the module docstring."""

    def __init__(self, leases: Leases, peers: PeerClient, metrics: ClusterMetrics) -> None:
        self._leases = leases
        self._peers = peers
        self._metrics = metrics
        self._backoff = LeaseBackoff(leases)

    async def source(
        self, digest: Digest, offset: int, following: str | None
    ) -> Following | Lease | None:
        """The owner's body from `offset`, or the lease (fetch it here), or None (alone).
        `following`: the owner this download followed until now, if any."""
        give_up = time.monotonic() + max(PATIENCE_TTLS * self._leases.ttl, MIN_PATIENCE)
        delay = RETRY_FIRST
        first = following is None  # a new follower: counted once, as a wait
        followed = following  # an owner whose bytes this download got: a takeover from it
        while time.monotonic() < give_up:
            got = await self._backoff.acquire(lease_name(digest))
            if got is None:
                self._metrics.lease_unavailable.labels(KIND).inc()
                return None
            if isinstance(got, Lease):
                if followed is not None:  # the owner died, or failed, mid-download
                    self._metrics.lease_takeovers.labels(KIND).inc()
                    log.info("blob %s: taken over from %s at byte %d", digest, followed, offset)
                return got
            if got.ours:
                # This replica's previous download of the blob, releasing its lease as it
                # ends: asking ourselves would find only this download. It is gone shortly.
                delay = await self._pause(delay)
                continue
            if got.owner == self._leases.owner:
                log.error(
                    "blob %s: another replica holds it under this replica's own "
                    "cluster.advertise_url %s: each replica needs an address of its own; "
                    "fetching it here", digest, got.owner,
                )  # fmt: skip
                self._metrics.owners_refused.inc()
                return None
            try:
                body = await self._peers.open_blob(got.owner, digest, offset)
            except BlobUnknown:  # the owner's upstream answer, taken as ours
                self._metrics.lease_waits.labels(KIND).inc()
                raise
            except PeerRefused as exc:  # never asked: waiting would not change it
                log.warning("blob %s: %s; fetching it here", digest, exc)
                return None
            except PeerUnavailable as exc:
                if delay == RETRY_FIRST:  # once per wait: the retries follow quickly
                    log.info("blob %s: owner not answering (%s); asking again", digest, exc)
                following = following or got.owner  # asked, not followed: no takeover
                delay = await self._pause(delay)
                continue
            if first:
                self._metrics.lease_waits.labels(KIND).inc()
            return Following(got.owner, body)
        log.warning("blob %s: its owner %s never answered; fetching it here", digest, following)
        return None

    async def _pause(self, delay: float) -> float:
        """Sleep `delay`; the next one (doubled, up to a quarter of the lease TTL)."""
        await asyncio.sleep(delay)
        return min(delay * 2, self._leases.ttl / 4)


def lease_name(digest: Digest | str) -> str:
    """The lease a blob's download holds (its live upload too: bucketshare.py)."""
    return f"{KIND}:{digest}"
