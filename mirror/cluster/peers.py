"""Blobs between replicas, the client side: a follower streams a blob from its owner.

    follower ── GET /_cluster/blobs/<digest>, Range: bytes=N-, signed ──► owner

The owner answers (mirror/web/peer.py) with a 206 whose Content-Range names the first byte
and the blob's size, so a follower that resumes checks where the bytes start; a 404 marked
UPSTREAM_UNKNOWN means the owner's download found no such blob upstream.
"""

from __future__ import annotations

import ssl

import aiohttp

from mirror.cluster import peerauth
from mirror.observe.cluster_metrics import ClusterMetrics
from mirror.oci.errors import BlobUnknown
from mirror.oci.reference import Digest
from mirror.upstream.body import BlobBody
from mirror.upstream.client import new_session

PEER_PATH = "/_cluster/blobs/{digest}"
# Marks an owner's 404 that came from the upstream (its download found no such blob), as
# against "not here": its followers then fail alike instead of asking the upstream in turn.
UPSTREAM_UNKNOWN = "Mirror-Upstream-Unknown"


class PeerUnavailable(Exception):
    """The owner did not answer with the blob from the byte asked (gone, or not there)."""


class PeerClient:
    """Opens blob streams from other replicas, on one session of its own."""

    def __init__(
        self,
        secret: bytes,
        metrics: ClusterMetrics,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
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
        body = BlobBody.of(resp) if resp.status == 206 else None
        if body is None or body.offset != offset:
            resp.release()
            raise PeerUnavailable(f"{owner} answered {resp.status} for {digest} from {offset}")
        self._metrics.peer_streams.labels("in").inc()
        return body
