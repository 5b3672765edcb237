"""What the mirror knows of its blobs in the bucket: sizes and last reads, and its bound.

The records live in the metadata store (Redis, or in-process with its snapshot; memory
stands in while Redis is down, so no call here fails for Redis), so that knowing a blob is
in the bucket costs no S3 request (a redirect asks the record: one metadata request) and
the bucket can be kept under `storage.s3.max_size` by last-read time. Whichever process
evicts a blob drops its record: the record is the truth, what this process remembers of it
only a cache, and a read moves a record on but never makes one (the blob may be gone).
Records get lost (a single mirror killed before its snapshot, Redis restarted without
persistence or failed over, records written to the in-memory fallback during an outage),
and objects go behind the mirror's back: at start and (with a bound) every
RECONCILE_INTERVAL the records are made to match a listing (a record added for each listed
blob that has none, its upload time as its last read; the record of each blob no longer
listed dropped), so that eviction counts every object. An object is never deleted while it
is being read, here or by another process sharing the bucket (nor within `evict_grace` of
another replica's last stream of it), nor within `redirect_ttl` of a redirect to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from mirror.metadata.store import MetadataStore
from mirror.observe.metrics import Metrics
from mirror.oci.reference import Digest, as_digest
from mirror.storage.base import LOW_WATER, SCAN_INTERVAL, EvictionResult
from mirror.storage.s3.bucket import S3_ERRORS, Bucket
from mirror.storage.sharing import BucketSharing

log = logging.getLogger(__name__)

# A read is written to the metadata store at most this often per blob: a hot blob must not
# cost a write per request.
TOUCH_INTERVAL = 1.0
# How often the records are checked against a listing of the bucket. A listing costs one
# ListObjectsV2 per 1,000 objects and its pages come one after another: hourly, a bucket
# of a million blobs costs 24,000 LISTs a day (cents on AWS) and a pass of a couple of
# minutes, next to which its GETs dominate; lost records are rare, and until the next pass
# the bucket exceeds its bound by at most the blobs whose records were lost.
RECONCILE_INTERVAL = 3600.0


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
        # digest → size of the blobs recorded as in the bucket, as this process last saw
        # the records: a cache of them, which another process's eviction does not reach.
        # It spares a local-tier hit of a blob not in the bucket its metadata write; a
        # redirect asks the record itself.
        self._sizes: dict[str, int] = {}
        self._loaded = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Whether this process may run an eviction pass now, and who reads what elsewhere.
        self._sharing = sharing
        self.reconcile_interval = RECONCILE_INTERVAL
        self._reconciled_at: float | None = None  # monotonic; None: not since the start

    def start(
        self,
        metadata: MetadataStore,
        busy: Callable[[], Iterable[object]],
        *,
        keep_bound: bool = True,
    ) -> None:
        """Load the records; with `keep_bound`, keep the bucket under its bound from now on
        (a one-shot command does not: `gc` evicts once, and alone, so its report is right;
        `ls` never evicts)."""
        self._metadata = metadata
        self._busy = busy
        self._task = asyncio.create_task(self._run(keep_bound))

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
        """A blob in the bucket was read (from either tier): its record's last read moved
        on, never the record made anew (the blob may have been evicted elsewhere)."""
        key = str(digest)
        if key in self._sizes and self._touch_due(key):
            await self._touch(key)

    async def known(self, digest: Digest) -> bool:
        """Is the blob recorded as in the bucket? One metadata read, no S3 request: the
        record is the truth, dropped by whichever process evicts the blob."""
        key = str(digest)
        if self._metadata is None:
            return key in self._sizes
        record = await self._metadata.get_blob_read(key)
        if record is None:
            self._dropped(key)
            return False
        self._sizes[key] = record[0]
        return True

    async def redirected(self, digest: Digest) -> bool:
        """`known`, and when it is, a read of the blob (for the LRU, and so that no
        eviction deletes it within `redirect_ttl`): one metadata request either way."""
        key = str(digest)
        if self._touch_due(key):
            return await self._touch(key)
        return await self.known(digest)

    def _touch_due(self, key: str) -> bool:
        return time.monotonic() - self._touched.get(key, -TOUCH_INTERVAL) >= TOUCH_INTERVAL

    async def _touch(self, key: str) -> bool:
        """The record's last read moved on, if there is a record: is there?"""
        if self._metadata is None:
            return key in self._sizes
        self._touched[key] = time.monotonic()
        size = await self._metadata.touch_blob_read(key, time.time())
        if size is None:
            self._dropped(key)
            return False
        self._sizes[key] = size
        return True

    def _dropped(self, key: str) -> None:
        """Forget locally a record another process dropped (it evicted the blob)."""
        self._sizes.pop(key, None)
        self._touched.pop(key, None)

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
    async def _run(self, keep_bound: bool) -> None:
        try:
            await self._chores(evict=False)  # the start's reconciliation
            for digest, (size, _) in (await self._records()).items():
                self._sizes.setdefault(digest, size)
        finally:
            self._loaded.set()
        if self._max_size is None or not keep_bound:
            return
        while True:
            await self._chores(evict=True)
            try:
                async with asyncio.timeout(SCAN_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _chores(self, *, evict: bool) -> None:
        """The reconciliation when due, and an eviction pass: by one process at a time
        among those sharing the bucket (the others' turn comes at their next wake)."""
        try:
            async with self._sharing.exclusive() as mine:
                if not mine:
                    return
                if self._reconcile_due():
                    await self.reconcile()
                if evict:
                    await self.evict()
        except Exception as exc:  # the chore must outlive any failure: next time, again
            log.warning("bucket eviction pass failed: %s", type(exc).__name__)

    def _reconcile_due(self) -> bool:
        done = self._reconciled_at
        return done is None or time.monotonic() - done >= self.reconcile_interval

    async def reconcile(self) -> None:
        """Records made to match one listing of the bucket's blobs (see the module
        docstring). A listing cut short proves nothing gone: it changes nothing."""
        if self._metadata is None:
            return
        started = time.time()
        listed: dict[str, tuple[int, float]] = {}
        keys = self._bucket.keys
        try:
            async for found in self._bucket.objects(keys.under("blobs")):
                name = keys.name("blobs", found.key)
                if as_digest(name) is not None:  # a stray object is not ours to count
                    listed[name] = (found.size, found.modified)
        except S3_ERRORS as exc:
            log.warning("cannot list the bucket's blobs: %s", type(exc).__name__)
            return
        records = await self._records()
        added = [name for name in listed if name not in records]
        for name in added:
            size, modified = listed[name]
            await self._metadata.put_blob_read(name, size, modified)
            self._sizes[name] = size
        # A record written since the listing began may be of an object stored after the
        # listing passed its key: only older ones are known to be gone.
        gone = [name for name, (_, at) in records.items() if name not in listed and at < started]
        for name in gone:
            await self.forget_key(name)
        self._reconciled_at = time.monotonic()
        if added or gone:
            log.info(
                "bucket records reconciled with a listing: %d added, %d dropped",
                len(added), len(gone),
            )  # fmt: skip

    async def loaded(self) -> None:
        """Until the records are loaded at start (the start's listing done, if it was ours)."""
        if self._task is not None:
            await self._loaded.wait()

    async def evict(self, max_size: int | None = None) -> EvictionResult:
        """Delete the least recently read blobs until the bucket is under its bound."""
        bound = max_size if max_size is not None else self._max_size
        await self.loaded()
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
        self._dropped(digest)
        if self._metadata is not None:
            await self._metadata.forget_blob(digest)
