"""Blobs between replicas, the client side: a follower streams a blob from its owner.

    follower ── GET /_cluster/blobs/<digest>, Range: bytes=N-, signed ──► owner

The owner answers (mirror/web/peer.py) with a 206 whose Content-Range names the first byte
and the blob's size, so a follower that resumes checks where the bytes start; a 404 marked
UPSTREAM_UNKNOWN means the owner's download found no such blob upstream. An owner's URL is
read from Redis: only one of this replica's own address form (cluster.advertise_url: its
scheme, a port written or not, its path) is asked, and no redirect of it is followed.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import aiohttp

from mirror.cluster import peerauth
from mirror.observe.cluster_metrics import ClusterMetrics
from mirror.oci.errors import BlobTooLarge, BlobUnknown
from mirror.oci.reference import Digest
from mirror.upstream.body import BlobBody, SizeLimit
from mirror.upstream.client import new_session

PEER_PATH = "/_cluster/blobs/{digest}"
# Marks an owner's 404 that came from the upstream (its download found no such blob), as
# against "not here": its followers then fail alike instead of asking the upstream in turn.
UPSTREAM_UNKNOWN = "Mirror-Upstream-Unknown"


class PeerUnavailable(Exception):
    """The owner did not answer with the blob from the byte asked (gone, or not there)."""


class PeerRefused(PeerUnavailable):
    """Asking the owner again would not help: its URL is not of the cluster's address form
    (it is not asked at all), or it refused this replica's signature."""


class PeerClient:
    """Opens blob streams from other replicas, on one session of its own."""

    def __init__(
        self,
        secret: bytes,
        metrics: ClusterMetrics,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        *,
        advertise_url: str,
        max_blob_size: int | None = None,
    ) -> None:
        self._form = _form(advertise_url)
        # storage.max_blob_size holds for a peer's bytes as for an upstream's: a peer is
        # whoever an owner URL in Redis names, and its stream lands on this disk.
        self._max_blob_size = max_blob_size
        self._secret = secret
        self._metrics = metrics
        self._session = new_session(connect_timeout, read_timeout)
        # None: aiohttp's default context, which verifies against the system's CAs.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

    async def close(self) -> None:
        await self._session.close()

    async def open_blob(self, owner: str, digest: Digest, offset: int) -> BlobBody:
        """The owner's body of the blob from `offset` (the caller releases it);
        PeerUnavailable when the owner cannot give exactly that, BlobUnknown when its
        download found the blob unknown upstream."""
        if _form(owner) != self._form:
            self._metrics.owners_refused.inc()
            raise PeerRefused(f"owner URL {owner[:100]!r} is not of cluster.advertise_url's form")
        path = PEER_PATH.format(digest=digest)
        headers = {
            "Range": f"bytes={offset}-",
            peerauth.HEADER: peerauth.sign(self._secret, "GET", path),
        }
        try:
            resp = await self._session.get(
                owner + path, headers=headers, ssl=self._ssl, allow_redirects=False
            )
        except aiohttp.ClientSSLError as exc:  # its certificate does not verify: not a peer
            self._metrics.peer_untrusted.inc()
            raise PeerUnavailable(f"{owner}: TLS refused: {type(exc).__name__}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(f"{owner}: {type(exc).__name__}") from None
        if resp.status == 404 and UPSTREAM_UNKNOWN in resp.headers:
            resp.release()
            raise BlobUnknown(f"blob {digest} is unknown upstream")
        if resp.status == 401:  # a signature it refuses now, it refuses on every retry
            resp.release()
            self._metrics.peer_rejected.inc()
            raise PeerRefused(
                f"{owner[:100]} refused this replica's signature: another cluster.secret, "
                "or clocks more than a minute apart"
            )
        body = BlobBody.of(resp, self._limit(owner, digest), offset) if resp.status == 206 else None
        if body is None:
            resp.release()
            raise PeerUnavailable(f"{owner} answered {resp.status} for {digest} from {offset}")
        self._metrics.peer_streams.labels("in").inc()
        return body

    def _limit(self, owner: str, digest: Digest) -> SizeLimit | None:
        most = self._max_blob_size
        if most is None:
            return None

        def refused() -> BlobTooLarge:
            self._metrics.peer_too_large.inc()
            return BlobTooLarge(
                f"replica {owner[:100]} sent blob {digest} larger than "
                f"storage.max_blob_size ({most} bytes)"
            )

        return SizeLimit(most, refused)


def _form(url: str) -> tuple[str, bool, str] | None:
    """(scheme, whether a port is written, path) of a replica's URL; None when it is no
    plain http(s) URL of a host (credentials, a query or a fragment in it). The port itself
    may differ: replicas on one machine listen on ports of their own."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    plain = not (parts.username or parts.password or "?" in url or "#" in url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not plain:
        return None
    return parts.scheme, port is not None, parts.path.rstrip("/")
