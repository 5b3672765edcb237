"""What the mirror knows of its blobs in the bucket: sizes and last reads, and its bound.

The records live in the metadata store (Redis, or in-process with its snapshot; memory
stands in while Redis is down, so no call here fails for Redis), so that knowing a blob is
in the bucket costs no S3 request (a redirect needs none) and the bucket can be kept under
`storage.s3.max_size` by last-read time. Records that are missing (a new metadata store)
are rebuilt from one listing of the bucket. An object is never deleted while it is being
read, here or by another process sharing the bucket (nor within `evict_grace` of another
replica's last stream of it), nor within `redirect_ttl` of a redirect to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from mirror.metadata.store import MetadataStore
from mirror.observe.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.storage.base import LOW_WATER, SCAN_INTERVAL, EvictionResult
from mirror.storage.s3.bucket import S3_ERRORS, Bucket
from mirror.storage.sharing import BucketSharing

log = logging.getLogger(__name__)

# A read is written to the metadata store at most this often per blob: a hot blob must not
# cost a write per request.
TOUCH_INTERVAL = 1.0


class BucketIndex:
    """Records of the bucket's blobs; evicts the least recently read above the bound."""

    def __init__(
        self,
        bucket: Bucket,
        metrics: Metrics,
        sharing: BucketSharing,
    ) -> None:
        self._bucket = bucket
        self._metrics = metrics
        self._max_size = bucket.config.max_size
        # With redirects, a client may fetch from the bucket up to redirect_ttl after the
        # 307; a read record protects the object that long.
        self._protect = (
            bucket.config.redirect_ttl + TOUCH_INTERVAL if bucket.config.redirect else 0.0
        )
        self._metadata: MetadataStore | None = None
        self._busy: Callable[[], Iterable[object]] = tuple
        self._touched: dict[str, float] = {}
        # digest → size of the blobs known to be in the bucket: loaded from the records at
        # start, then kept up to date, so a local-tier hit costs no metadata read.
        self._sizes: dict[str, int] = {}
        self._loaded = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Whether this process may run an eviction pass now, and who reads what elsewhere.
        self._sharing = sharing

    def start(self, metadata: MetadataStore, busy: Callable[[], Iterable[object]]) -> None:
        self._metadata = metadata
        self._busy = busy
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- records ---------------------------------------------------------------------------
    async def stored(self, digest: Digest, size: int) -> None:
        """A blob became visible in the bucket."""
        self._sizes[str(digest)] = size
        await self._record(str(digest), size)
        self._wake.set()

    async def read(self, digest: Digest) -> None:
        """A blob in the bucket was read (from either tier) or redirected to."""
        key = str(digest)
        size = self._sizes.get(key)
        if (
            size is None
            or time.monotonic() - self._touched.get(key, -TOUCH_INTERVAL) < TOUCH_INTERVAL
        ):
            return
        self._touched[key] = time.monotonic()
        await self._record(key, size)

    async def known(self, digest: Digest) -> bool:
        """Is the blob recorded as in the bucket (no S3 request)?"""
        key = str(digest)
        if key in self._sizes:
            return True
        if self._metadata is None:
            return False
        record = await self._metadata.get_blob_read(key)  # another replica may have stored it
        if record is None:
            return False
        self._sizes[key] = record[0]
        return True

    async def forget(self, digest: Digest) -> None:
        await self.forget_key(str(digest))

    async def _record(self, digest: str, size: int) -> None:
        if self._metadata is not None:
            await self._metadata.put_blob_read(digest, size, time.time())

    async def _records(self) -> dict[str, tuple[int, float]]:
        if self._metadata is None:
            return {}
        return await self._metadata.blob_reads()

    # --- eviction ----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self.rebuild_if_empty()
            for digest, (size, _) in (await self._records()).items():
                self._sizes.setdefault(digest, size)
        finally:
            self._loaded.set()
        if self._max_size is None:
            return
        while True:
            try:
                async with self._sharing.exclusive() as mine:
                    if mine:
                        await self.evict()
            except S3_ERRORS as exc:
                log.warning("bucket eviction pass failed: %s", type(exc).__name__)
            try:
                async with asyncio.timeout(SCAN_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def rebuild_if_empty(self) -> None:
        """Records for what the bucket holds, when the metadata store has none."""
        if self._metadata is None or await self._records():
            return
        keys = self._bucket.keys
        try:
            async for found in self._bucket.objects(keys.under("blobs")):
                name = keys.name("blobs", found.key)
                await self._metadata.put_blob_read(name, found.size, found.modified)
        except S3_ERRORS as exc:
            log.warning("cannot list the bucket's blobs: %s", type(exc).__name__)

    async def evict(self, max_size: int | None = None) -> EvictionResult:
        """Delete the least recently read blobs until the bucket is under its bound."""
        bound = max_size if max_size is not None else self._max_size
        if self._task is not None:
            await self._loaded.wait()
        records = await self._records()
        total = sum(size for size, _ in records.values())
        if bound is None or total <= bound:
            return EvictionResult(0, 0, total)
        target = int(bound * LOW_WATER) if max_size is None else bound
        busy = {str(digest) for digest in self._busy()}
        now, evicted, freed = time.time(), 0, 0
        for digest, (size, read_at) in sorted(records.items(), key=lambda item: item[1][1]):
            if total - freed <= target:
                break
            if digest in busy or now - read_at < self._protect:
                continue
            if await self._sharing.read_elsewhere(digest):  # streamed by another process
                continue
            await self._bucket.delete(self._bucket.keys.blob(digest))
            await self.forget_key(digest)
            evicted, freed = evicted + 1, freed + size
            self._metrics.bucket_evictions.inc()
        if evicted:
            log.info("evicted %d blobs from the bucket, %d bytes", evicted, freed)
        return EvictionResult(evicted, freed, total - freed)

    async def forget_key(self, digest: str) -> None:
        self._sizes.pop(digest, None)
        self._touched.pop(digest, None)
        if self._metadata is not None:
            await self._metadata.forget_blob(digest)
