"""The bucket's chores among replicas, told apart by leases (storage/sharing.py asks).

- Eviction (`storage.s3.max_size`) runs under the lease `evict:bucket`: each replica's
  index wakes on its own uploads and reads the same shared records, and two passes at once
  would delete more than the bound asks. A replica that finds the lease held skips its
  pass (the holder's covers the bucket); without Redis there are no shared records to go
  by, so no pass.
- The pass leaves the objects another replica streams from the bucket, or streamed within
  `storage.s3.evict_grace` (marks in Redis: cluster/readmarks.py); one it cannot ask about
  (Redis gone mid-pass) is left too.
- A starting replica aborts the multipart uploads left open by a crash, but not another
  replica's live one: a live upload's blob has its lease held (`blob:<digest>`). With Redis
  down every upload counts as live: nothing is aborted that may still complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from mirror.cluster.blobflight import lease_name
from mirror.cluster.lease import Lease, Leases
from mirror.cluster.readmarks import ReadMarks
from mirror.metadata.topology import DOWN_ERRORS

log = logging.getLogger(__name__)

EVICT_LEASE = "evict:bucket"


class BucketShare:
    """`BucketSharing` by the leases `leases()` returns: the replica's, once the app has
    started them (the storage is built before), or None."""

    owners_known = True  # every live upload holds its blob's lease

    def __init__(self, leases: Callable[[], Leases | None]) -> None:
        self._leases = leases
        self._marks: ReadMarks | None = None

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        """Yields True while this replica holds the eviction lease (kept until the end)."""
        leases = self._leases()
        got = None if leases is None else await leases.acquire(EVICT_LEASE)
        if not isinstance(got, Lease):
            log.debug("bucket eviction pass skipped: %s", "held elsewhere" if got else "no Redis")
            yield False
            return
        async with got.kept():
            yield True

    @contextlib.asynccontextmanager
    async def uploading(self, digest: str) -> AsyncIterator[bool]:
        """Under the blob's lease, as its download's upload: no other replica aborts it.
        Held elsewhere: that replica's download uploads it. No Redis: every upload counts
        as live for the others, so this one too."""
        leases = self._leases()
        got = None if leases is None else await leases.acquire(lease_name(digest))
        if got is None:
            yield True
        elif isinstance(got, Lease):
            async with got.kept():
                yield True
        else:
            yield False

    async def upload_live(self, digest: str) -> bool:
        leases = self._leases()
        return leases is not None and await _held(leases, lease_name(digest))

    async def begin_read(self, digest: str) -> None:
        marks = self._read_marks()
        if marks is not None:
            await marks.begin(digest)

    async def end_read(self, digest: str, grace: float) -> None:
        marks = self._read_marks()
        if marks is not None:
            await marks.end(digest, grace)

    async def read_elsewhere(self, digest: str) -> bool:
        marks = self._read_marks()
        return marks is None or await marks.marked(digest)

    async def close(self) -> None:
        if self._marks is not None:
            await self._marks.close()

    def _read_marks(self) -> ReadMarks | None:
        if self._marks is None:
            leases = self._leases()
            self._marks = None if leases is None else ReadMarks(leases)
        return self._marks


async def _held(leases: Leases, name: str) -> bool:
    try:
        async with leases.turns:
            return bool(await leases.client.exists(leases.key(name)))
    except DOWN_ERRORS:
        return True
