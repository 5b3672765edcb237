"""The bucket's chores among replicas, told apart by leases.

- Eviction (`storage.s3.max_size`) runs under the lease `evict:bucket`: each replica's
  index wakes on its own uploads and reads the same shared records, and two passes at once
  would delete more than the bound asks. A replica that finds the lease held skips its
  pass (the holder's covers the bucket); without Redis there are no shared records to go
  by, so no pass.
- A starting replica aborts the multipart uploads left open by a crash, but not another
  replica's live one: a live upload's blob has its lease held (`blob:<digest>`). With Redis
  down every upload counts as live: nothing is aborted that may still complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirror.cluster.lease import Lease, Leases
from mirror.metadata.topology import DOWN_ERRORS
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import config_key, leases_key, storage_key

log = logging.getLogger(__name__)

EVICT_LEASE = "evict:bucket"


def share_bucket(app: web.Application) -> None:
    """With a cluster and a bucket, make the bucket's chores ask the leases (which exist
    once the app has started: the hooks read them then)."""
    storage = app[storage_key]
    if app[config_key].cluster is None or not isinstance(storage, TieredStorage):
        return
    prefix = storage.bucket.config.prefix + "blobs/"

    @contextlib.asynccontextmanager
    async def exclusive() -> AsyncIterator[bool]:
        leases = app.get(leases_key)
        got = None if leases is None else await leases.acquire(EVICT_LEASE)
        if not isinstance(got, Lease):
            log.debug("bucket eviction pass skipped: %s", "held elsewhere" if got else "no Redis")
            yield False
            return
        async with got.kept():
            yield True

    async def upload_live(key: str) -> bool:
        leases = app.get(leases_key)
        if leases is None or not key.startswith(prefix):
            return False
        return await _held(leases, "blob:" + key[len(prefix) :].replace("/", ":", 1))

    storage.index.exclusive = exclusive
    storage.upload_live = upload_live
    storage.upload_owners_known = True


async def _held(leases: Leases, name: str) -> bool:
    try:
        return bool(await leases.client.exists(leases.key(name)))
    except DOWN_ERRORS:
        return True
