"""The size of a blob not cached, as the upstream gives it to a HEAD: asked once at a time.

Concurrent HEADs of one uncached blob make one upstream HEAD; with replicas, one among them
all (the lease `blobsize:<upstream>/<repo>@<digest>`): the holder keeps the size like a tag
(a record under a key no tag can take, `size+<alg>-<hex>`, fresh for the tag TTL), and the
others read it there. A blob is immutable, so a size kept by another replica stays true;
the upstream's 404 reaches the waiters as it reached the holder (`LOOKUP_FAILED`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mirror.cache.manifests import LOOKUP_FAILED, ManifestService
from mirror.metadata.store import TagRecord
from mirror.oci.reference import Digest
from mirror.upstream.client import Upstream
from mirror.util.singleflight import SingleFlight

# A record's size when the upstream did not say one (a HEAD without Content-Length).
UNSAID = -1


@dataclass(frozen=True, slots=True)
class Sized:
    """What the upstream said of a blob's size (None: nothing)."""

    size: int | None


def size_key(digest: Digest) -> str:
    """Where a blob's size is kept: `+` is in no tag, so no real tag can collide."""
    return f"size+{digest.algorithm}-{digest.hex}"


class BlobSizes:
    """Upstream HEADs of uncached blobs, coalesced (across replicas too)."""

    def __init__(self, manifests: ManifestService) -> None:
        self._manifests = manifests
        self._flight = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def size(self, upstream: Upstream, repo: str, digest: Digest) -> int | None:
        """The blob's size upstream, None when it does not say; BlobUnknown when absent."""
        found = await self._flight.do(
            (upstream.name, repo, str(digest)),
            lambda: self._manifests.shared.once(
                "blobsize",
                f"blobsize:{upstream.name}/{repo}@{digest}",
                lambda: self._kept(upstream, repo, digest),
                lambda: self._ask(upstream, repo, digest),
                LOOKUP_FAILED,
            ),
        )
        return found.size

    async def _kept(self, upstream: Upstream, repo: str, digest: Digest) -> Sized | None:
        """The size another replica kept within the tag TTL, if one did."""
        record = await self._manifests.metadata.get_tag(upstream.name, repo, size_key(digest))
        if record is None or not record.is_fresh(self._manifests.ttl_of(upstream)):
            return None
        return Sized(None if record.size < 0 else record.size)

    async def _ask(self, upstream: Upstream, repo: str, digest: Digest) -> Sized:
        size = await upstream.blob_size(repo, str(digest))
        if self._manifests.shared.enabled:  # alone, nobody would read it
            said = UNSAID if size is None else size
            record = TagRecord(str(digest), "", said, time.time())
            await self._manifests.metadata.put_tag(upstream.name, repo, size_key(digest), record)
        return Sized(size)
