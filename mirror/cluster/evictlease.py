"""Bucket eviction on one replica at a time: the pass runs under the lease `evict:bucket`.

Every replica's index wakes when it stores a blob and every few minutes; two passes at once
would read the same records and delete more than the bound asks. The holder of the lease
evicts; a replica that finds it held skips its pass (the holder's pass covers the bucket,
as the records are shared). Without Redis there are no shared records to go by: no pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from mirror.cluster.lease import Lease, Leases
from mirror.storage import CacheStore
from mirror.storage.tiered import TieredStorage

log = logging.getLogger(__name__)

LEASE = "evict:bucket"


def evict_one_at_a_time(storage: CacheStore, leases: Leases | None) -> None:
    """Make the bucket's eviction (if there is a bucket) take the cluster's lease."""
    if leases is None or not isinstance(storage, TieredStorage):
        return

    @contextlib.asynccontextmanager
    async def exclusive() -> AsyncIterator[bool]:
        got = await leases.acquire(LEASE)
        if not isinstance(got, Lease):
            log.debug("bucket eviction skipped: %s", "held elsewhere" if got else "no Redis")
            yield False
            return
        async with got.kept():
            yield True

    storage.index.exclusive = exclusive
