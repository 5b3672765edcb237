"""The cache in an S3 bucket, with the directory as a local tier in front of it.

    blob GET:  local tier (sendfile) ─ miss ─► one GET (Range passed through): a whole
               object through a temp file of the local tier (sendfile from it as it
               lands, kept once verified; over plain HTTP a presigned GET spliced into
               it), a range relayed
               ─ 404 ─► upstream, as a cold miss; with `redirect`: a 307 to a presigned
               URL when the records say the bucket has it (no S3 request)
    download:  temp file in the local tier, uploaded to the bucket as it grows; the object
               is visible only once the digest matched, then the file is renamed locally
    manifest:  local tier ─ miss ─► GetObject (media type kept as its Content-Type); an
               object too large, or of no manifest media type, is a miss

While the bucket does not answer, the local tier serves what it has and everything else is
relayed from upstream uncached (as with a full disk): `writable_now` is False then. What
the local tier kept meanwhile (manifests; a blob whose upload the bucket cut) is sent to
the bucket once it answers again (s3/catchup.py).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import http.client
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import aiohttp
from botocore.exceptions import ClientError

from mirror.config.s3 import S3Config
from mirror.metadata.store import MetadataStore
from mirror.net.splice import SplicedGet, can_splice
from mirror.observe.metrics import Metrics
from mirror.oci.negotiation import MAX_MANIFEST_BYTES, manifest_media_type
from mirror.oci.reference import Digest, as_digest, compute_digest
from mirror.storage.base import (
    NO_SPACE,
    BlobSize,
    Found,
    NotTidied,
    NoUpload,
    RangeOutsideBlob,
    Redirect,
    Upload,
    VerifyResult,
)
from mirror.storage.filesystem import Storage
from mirror.storage.localflight import Claim, LocalFlight
from mirror.storage.s3.bucket import CONNECT_TIMEOUT, READ_TIMEOUT, S3_ERRORS, Bucket
from mirror.storage.s3.catchup import Unsent
from mirror.storage.s3.index import BucketIndex
from mirror.storage.s3.keys import KINDS, Kind
from mirror.storage.s3.read import BucketStream
from mirror.storage.s3.sources import PiecesSource, SplicedSource
from mirror.storage.s3.spool import BucketSpool, SpoolFile, SpoolSource
from mirror.storage.s3.upload import BucketUpload, PartBuffers
from mirror.storage.sharing import Alone, BucketSharing
from mirror.util.threadfiles import owned_off_loop

log = logging.getLogger(__name__)

# A start, `mirror gc` and the hourly chore abort multipart uploads begun longer ago than
# this: a younger one may be live, in another process (`mirror ls` run beside `mirror
# serve`, a worker). Replicas know every live upload by its lease: there, any age.
ABANDONED_AFTER = 3600.0
# How often a running mirror aborts the uploads crashes left open (and once whenever the
# bucket answers again): an open upload's parts are stored, and billed, until aborted.
ABORT_INTERVAL = 3600.0
# A blob too large for the local tier goes to the bucket through a temp file, left in
# place this long after its download (for readers that joined late), then deleted.
OVERSIZE_GRACE = 60.0
VERIFY_PARALLEL = 4
# A spliced GET's presigned URL is used at once: it need not live longer.
SPLICE_URL_TTL = 60.0
# Bucket reads spliced at once, each a thread for its whole transfer.
MAX_SPLICES = 16


class _NotAsked(Exception):
    """An object `verify` did not ask for: the bucket had stopped answering by then."""


# What an object's check may fail with when the bucket, not the object, is at fault: the
# call, or its body read (cut, or timed out).
VERIFY_ERRORS = (*S3_ERRORS, _NotAsked, aiohttp.ClientError, OSError)  # timeouts too


class FallBack(enum.Enum):
    """A spliced GET did not serve: the GetObject does."""

    TOKEN = enum.auto()


FALL_BACK = FallBack.TOKEN


class TieredStorage(Storage):
    """`Storage` (the local tier) with a bucket behind it."""

    def __init__(
        self,
        root: Path,
        max_size: int | None,
        config: S3Config,
        metrics: Metrics,
        sharing: BucketSharing | None = None,
    ) -> None:
        super().__init__(root, max_size)
        self.bucket = Bucket(config, metrics)
        self._sharing = sharing or Alone()
        self.index = BucketIndex(self.bucket, metrics, self._sharing)
        self._config = config
        self._metrics = metrics
        # Blobs streamed from the bucket right now: its eviction leaves them alone.
        self.reading: Counter[str] = Counter()
        self._filling: set[Digest] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._part_buffers = PartBuffers()
        # Keys this process uploads to now: the abort of abandoned uploads leaves them.
        self._uploading: Counter[str] = Counter()
        self.abandoned_after = ABANDONED_AFTER
        self.abort_interval = ABORT_INTERVAL
        self._aborter: asyncio.Task[None] | None = None
        # What the local tier kept and the bucket did not get: sent when it answers again.
        self._unsent = Unsent(
            self.bucket,
            self._sharing,
            self._part_buffers,
            self.blob_path,
            self.verified_blob_size,
            super().read_manifest,
            self.index.stored,
        )
        self._catch_up: asyncio.Task[None] | None = None  # stopped, not awaited, at close
        self._bucket_back = asyncio.Event()
        self.bucket.on_up = self._bucket_back.set
        # Whole objects over plain HTTP are spliced into the local tier (net/splice.py),
        # each holding a thread of its own pool for the whole transfer (never one of the
        # loop's default threads, which every file operation needs); with all of them
        # busy, a read takes the GetObject.
        self._splice = config.endpoint is not None and can_splice(config.endpoint)
        self._splicers = ThreadPoolExecutor(MAX_SPLICES, thread_name_prefix="bucket-splice")
        self._splicing = 0

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await super().open()
        await self.bucket.open()
        if self.bucket.up:
            await self._abort_uploads(older_than=self._abandoned_after)

    async def close(self) -> None:
        chores = [task for task in (self._aborter, self._catch_up) if task is not None]
        for task in chores:
            task.cancel()
        await asyncio.gather(*chores, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        self._splicers.shutdown(wait=False, cancel_futures=True)
        await self._sharing.close()
        await self.index.close()
        await self.bucket.close()
        await super().close()

    async def attach(self, metadata: MetadataStore, busy: Callable[[], Iterable[object]]) -> None:
        self.index.start(metadata, lambda: [*busy(), *self.reading], keep_bound=not self.offline)
        self._aborter = asyncio.create_task(self._abort_abandoned())

    async def writable_now(self) -> bool:
        """New blobs are cached only while both the directory and the bucket take them."""
        return await super().writable_now() and await self.bucket.up_now()

    async def health(self) -> dict[str, str]:
        return {"bucket": "ok" if await self.bucket.up_now() else "unreachable"}

    # --- blobs -----------------------------------------------------------------------------
    async def blob_size(self, digest: Digest) -> int | None:
        """A local-tier hit is a read of the bucket's copy too (for the bucket's LRU)."""
        size = await super().blob_size(digest)
        if size is not None:
            await self.index.read(digest)
        return size

    async def find_blob(
        self, digest: Digest, byte_range: str | None, *, head: bool
    ) -> Found | None:
        if not await self.bucket.up_now():
            return None
        key = self.bucket.keys.blob(digest)
        try:
            if head:
                size = await self.bucket.size(key)
                found: Found | None = None if size is None else BlobSize(size)
            elif self._config.redirect:
                found = await self._redirect(digest, key)
            else:
                found = await self._stream(digest, key, byte_range)
        except S3_ERRORS as exc:
            log.warning("blob %s not read from the bucket: %s", digest, type(exc).__name__)
            return None
        if found is None:
            await self.index.forget(digest)
            return None
        self._metrics.tier_hits.labels("bucket").inc()
        return found

    async def _redirect(self, digest: Digest, key: str) -> Redirect | None:
        """A presigned URL when the shared record says the bucket has the blob (one
        metadata request; signing is local; only a blob with no record costs a HeadObject)."""
        if not await self.index.redirected(digest):
            size = await self.bucket.size(key)
            if size is None:
                return None
            await self.index.stored(digest, size)
        self._metrics.redirects.inc()
        return Redirect(await self.bucket.presign(key, self._config.redirect_ttl))

    async def _stream(
        self, digest: Digest, key: str, byte_range: str | None
    ) -> BucketStream | BucketSpool | None:
        name = str(digest)
        # Marked before the GET: from now on, an eviction pass of another replica leaves
        # the object alone (a mark that is not needed is dropped at once, no grace).
        try:
            await self._sharing.begin_read(name)
            stream = await self._open_stream(digest, key, byte_range)
        except BaseException:
            self._in_background(self._sharing.end_read(name, 0.0))
            raise
        if stream is None:
            self._in_background(self._sharing.end_read(name, 0.0))
        return stream

    async def _open_stream(
        self, digest: Digest, key: str, byte_range: str | None
    ) -> BucketStream | BucketSpool | None:
        splice = self._splice and self._splicing < MAX_SPLICES
        if byte_range is None and splice and digest not in self._filling:
            spliced = await self._open_spliced(digest, key)
            if spliced is not FALL_BACK:
                return spliced
        try:
            response = await self.bucket.get(key, byte_range)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 416:
                raise
            raise RangeOutsideBlob(await self.bucket.size(key) or 0) from None
        if response is None:
            return None
        await self.index.read(digest)
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        length = response["ContentLength"]
        file = await self._spool_file(digest, status, length)
        if file is None:
            return BucketStream(response, self._metrics, self._reading(digest))
        return self._spool(digest, length, PiecesSource(response["Body"]), file)

    async def _open_spliced(self, digest: Digest, key: str) -> BucketSpool | None | FallBack:
        """A whole object by a presigned GET, its body spliced into the local tier; None
        when the bucket has no such object; BucketUnavailable when it does not answer
        within its answer deadline. Any other answer, or no room here, falls back to the
        GetObject (its retries and errors as ever)."""
        self._filling.add(digest)  # claimed before the GET: a reader meanwhile is relayed
        self._splicing += 1
        spool: BucketSpool | None = None
        get: SplicedGet | None = None
        try:
            url = await self.bucket.presign(key, SPLICE_URL_TTL)
            deadline = self.bucket.answer_deadline  # for the head; the body: READ_TIMEOUT
            connect = min(CONNECT_TIMEOUT, deadline)
            get = SplicedGet(url, READ_TIMEOUT, connect_timeout=connect, head_timeout=deadline)
            if not await self._opened(get, key):
                return FALL_BACK
            if get.status == 404:
                return None
            if get.status != 200 or get.length is None:
                return FALL_BACK
            await self.index.read(digest)
            file = await self._new_spool_file(get.length)
            if file is None:
                return FALL_BACK
            source = SplicedSource(get, self._splicers, self._splice_done)
            spool = self._spool(digest, get.length, source, file)
            return spool
        finally:
            if spool is None:
                if get is not None:
                    get.close()
                self._filling.discard(digest)
                self._splice_done()

    def _splice_done(self) -> None:
        self._splicing -= 1

    async def _opened(self, get: SplicedGet, key: str) -> bool:
        """Has the spliced GET its answer's head? No head within the answer deadline, or
        no connection, marks the bucket down as a failed GetObject does (BucketUnavailable:
        the request goes on without the bucket at once, and those after it ask it not);
        a garbled head falls back to the GetObject (False)."""
        started = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(self._splicers, get.open)
        except OSError as exc:  # a timeout, a refused or reset connection
            self.bucket.count("GetObject", "error", started)
            raise self.bucket.unreachable("GetObject", exc) from None
        except http.client.HTTPException as exc:
            self.bucket.count("GetObject", "error", started)
            log.debug("spliced GET of %s failed: %s", key, type(exc).__name__)
            return False
        self.bucket.count("GetObject", str(get.status), started)
        return True

    def _spool(
        self, digest: Digest, length: int, source: SpoolSource, file: SpoolFile
    ) -> BucketSpool:
        return BucketSpool(
            length,
            source,
            digest,
            file,
            self._metrics,
            on_mismatch=lambda: self._delete_blob(digest),
            on_close=self._reading(digest),
            on_settled=lambda: self._filling.discard(digest),
            in_background=self._in_background,
        )

    def _reading(self, digest: Digest) -> Callable[[], None]:
        """Count a read of the object under way; the callable ends it."""
        name = str(digest)
        self.reading[name] += 1

        def done() -> None:
            self.reading[name] -= 1
            if self.reading[name] <= 0:
                del self.reading[name]
            self._in_background(self._sharing.end_read(name, self._config.evict_grace))

        return done

    def _in_background(self, work: Coroutine[None, None, None]) -> None:
        """Run `work` to its end whatever the client does (closing waits for it)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its own failure was told where it happened (a store down is logged there).
            log.debug("background work failed: %r", task.exception())

    async def _spool_file(self, digest: Digest, status: int, size: int) -> SpoolFile | None:
        """A temp file of the local tier for a whole-object read, unless one is being
        filled with this blob already or the local tier cannot take it now."""
        if status != 200 or digest in self._filling:
            return None
        self._filling.add(digest)
        try:
            file = await self._new_spool_file(size)
        except BaseException:  # cancelled: the blob may be spooled by the next read
            self._filling.discard(digest)
            raise
        if file is None:
            self._filling.discard(digest)
        return file

    async def _new_spool_file(self, size: int) -> SpoolFile | None:
        """A temp file with `size` bytes reserved, if the local tier can take it now."""
        if not super().fits(size):
            return None
        try:
            if await super().writable_now():
                return await owned_off_loop(
                    functools.partial(SpoolFile.create, self, size), SpoolFile.abandon
                )
        except OSError as exc:
            # No room for this object (others' downloads were promised it) is no fault of
            # the disk: the tier goes on taking what fits, as a download's refusal does.
            if exc.errno not in NO_SPACE or not await self.is_writable():
                self.mark_unwritable(exc)
        return None

    async def _delete_blob(self, digest: Digest) -> None:
        """Remove a bucket object that does not match its digest."""
        try:
            await self.bucket.delete(self.bucket.keys.blob(digest))
        except S3_ERRORS as exc:
            log.warning("cannot delete %s from the bucket: %s", digest, type(exc).__name__)
        await self.index.forget(digest)

    async def contains(self, digest: Digest) -> bool:
        if await self.blob_size(digest) is not None or await self.index.known(digest):
            return True
        try:
            return await self.bucket.size(self.bucket.keys.blob(digest)) is not None
        except S3_ERRORS as exc:
            log.warning("cannot tell if the bucket holds %s: %s", digest, type(exc).__name__)
            return False

    def fits(self, size: int | None) -> bool:
        """Larger than the local tier's bound, a blob can still be cached in the bucket."""
        if super().fits(size):
            return True
        bound = self._config.max_size
        return self.bucket.up and (bound is None or size is None or size <= bound)

    def commit(self, fd: int, temp: Path, final: Path) -> None:
        """As the directory does, unless the blob is too large for the local tier: then
        its temp file stays for OVERSIZE_GRACE (blocking: called in a worker thread)."""
        if super().fits(os.fstat(fd).st_size):
            super().commit(fd, temp, final)
            return
        os.close(fd)
        self._loop.call_soon_threadsafe(self._remove_later, temp)

    def _remove_later(self, temp: Path) -> None:
        def remove() -> None:
            self._in_background(asyncio.to_thread(temp.unlink, missing_ok=True))

        self._loop.call_later(OVERSIZE_GRACE, remove)

    def start_upload(self, digest: Digest, size: int | None, temp: Path) -> Upload:
        if not self.bucket.up:  # kept locally, if at all: sent when the bucket is back
            self._send_later("blobs", digest)
            return NoUpload()

        def stored(written: int) -> None:
            self._in_background(self.index.stored(digest, written))

        key = self.bucket.keys.blob(digest)
        final = self.blob_path(digest)  # read from there once the temp file is renamed
        unsent = functools.partial(self._send_later, "blobs", digest)
        upload = BucketUpload(
            self.bucket, key, size, temp, stored, self._part_buffers, final, unsent
        )
        return _OwnUpload(upload, key, self._uploading)

    # --- manifests -------------------------------------------------------------------------
    async def read_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        local = await super().read_manifest(digest)
        if local is not None or not await self.bucket.up_now():
            return local
        try:
            async with asyncio.timeout(2 * self.bucket.answer_deadline):  # its head, its body
                found = await self._bucket_manifest(digest)
        except (TimeoutError, *S3_ERRORS) as exc:
            log.warning("manifest %s not read from the bucket: %s", digest, type(exc).__name__)
            return None
        if found is None:
            return None
        try:
            await super().write_manifest(digest, *found)
        except OSError as exc:
            self.mark_unwritable(exc)
        return found

    async def _bucket_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """(media type, bytes) of the manifest object, checked as the upstream's answer is:
        None (a miss: fetched upstream) when it is too large, of no manifest media type
        (a bucket copied by a sync tool holds binary/octet-stream) or not of `digest`."""
        key = self.bucket.keys.manifest(digest)
        response = await self.bucket.get(key)
        if response is None:
            return None
        async with response["Body"] as body:
            if response.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
                log.warning("manifest %s in the bucket is too large: not read", digest)
                return None  # closed unread
            data = await body.read()
        self._metrics.s3_bytes.labels("received").inc(len(data))
        declared = response.get("ContentType", "").partition(";")[0].strip()
        media_type = manifest_media_type(declared, data)
        if media_type is None or compute_digest(data, digest.algorithm) != digest:
            log.warning("manifest %s in the bucket is not a valid manifest: not used", digest)
            return None
        return media_type, data

    async def write_manifest(self, digest: Digest, media_type: str, body: bytes) -> bool:
        """Into the bucket, then the local tier (whose disk may refuse: OSError)."""
        valid = compute_digest(body, digest.algorithm) == digest and "\n" not in media_type
        if valid and not await self._put_manifest(digest, media_type, body):
            self._send_later("manifests", digest)
        return await super().write_manifest(digest, media_type, body)

    def _send_later(self, kind: Kind, digest: Digest) -> None:
        """`digest` is kept locally, not in the bucket: sent once the bucket answers, at
        once when it does already (it may have come back while a download ran on)."""
        self._unsent.add(kind, digest)
        if self.bucket.up and (self._catch_up is None or self._catch_up.done()):
            self._catch_up = asyncio.create_task(self._unsent.send())

    async def _put_manifest(self, digest: Digest, media_type: str, body: bytes) -> bool:
        if not await self.bucket.up_now():
            return False
        try:
            key = self.bucket.keys.manifest(digest)
            await self.bucket.put(key, body, media_type, answering=True)
        except S3_ERRORS as exc:
            log.warning("manifest %s not stored in the bucket: %s", digest, type(exc).__name__)
            return False
        return True

    # --- commands (ls, gc, verify) -------------------------------------------------------------
    async def blob_sizes(self) -> dict[str, int]:
        sizes = await super().blob_sizes()
        keys = self.bucket.keys
        try:
            async for found in self.bucket.objects(keys.under("blobs")):
                sizes[keys.name("blobs", found.key)] = found.size
        except S3_ERRORS as exc:
            log.warning("cannot list the bucket: %s", type(exc).__name__)
        return sizes

    async def collect_garbage(self, to: int | None) -> list[str]:
        """`gc --to` bounds the bucket as it does the local tier; else s3.max_size does."""
        if not await self.bucket.up_now():  # else: "evicted 0 blobs", exit 0, for a cron job
            raise NotTidied("the bucket does not answer")
        aborted = await self._abort_uploads(older_than=self._abandoned_after)
        try:
            result = await self.index.evict(to)
        except S3_ERRORS as exc:
            raise NotTidied(f"the bucket failed: {type(exc).__name__}") from None
        return [
            f"bucket: evicted {result.evicted} blobs ({result.freed} bytes), "
            f"{result.remaining} bytes of blobs left; aborted {aborted} abandoned uploads"
        ]

    @property
    def _abandoned_after(self) -> float:
        """Alone, an upload is taken as abandoned only after ABANDONED_AFTER: a `mirror ls`
        or `gc` may run beside a live serve."""
        return 0.0 if self._sharing.owners_known else self.abandoned_after

    async def _abort_abandoned(self) -> None:
        """Every `abort_interval`, and once each time the bucket answers again, abort what
        crashes left open: in the eviction's turn, one process at a time (replicas)."""
        while True:
            try:
                async with asyncio.timeout(self.abort_interval):
                    await self._bucket_back.wait()
            except TimeoutError:
                pass
            self._bucket_back.clear()
            if not self.bucket.up:
                continue
            await self._unsent.send()
            try:
                async with self._sharing.exclusive() as mine:
                    if mine:
                        await self._abort_uploads(older_than=self._abandoned_after)
            except Exception as exc:  # the chore must outlive any failure: next time, again
                log.warning("abandoned uploads not aborted: %s", type(exc).__name__)

    def _own_upload(self, key: str) -> Digest | None:
        """The blob a multipart upload to `key` would store, when the key is one the mirror
        uploads to (`<prefix>blobs/<algorithm>/<hex>`, a valid digest); None for any other
        key. The bucket may be shared (the default prefix is ""): another application's
        uploads are never the mirror's to abort."""
        found = self.bucket.keys.parse(key)
        if found is None or found[0] != "blobs":
            return None
        digest = as_digest(found[1])
        if digest is None or self.bucket.keys.blob(digest) != key:
            return None
        return digest

    async def _upload_live(self, key: str, digest: Digest) -> bool:
        """Is the multipart upload to `key` a live one (this process's, another worker's
        on this directory, or another replica's): not to abort?"""
        if key in self._uploading:
            return True
        if self.shared and await asyncio.to_thread(self._fetched_by_a_worker, digest):
            return True
        return await self._sharing.upload_live(str(digest))

    def _fetched_by_a_worker(self, digest: Digest) -> bool:
        """Does another worker hold the blob's claim (its download and upload under way)?
        A claim taken here instead is let go at once (blocking); unknown: taken as live."""
        try:
            claimed = LocalFlight(self.tmp).claim(digest)
        except OSError:
            return True
        if isinstance(claimed, Claim):
            claimed.release()
            return False
        claimed.close()
        return True

    async def _abort_uploads(self, older_than: float) -> int:
        """Abort the mirror's multipart uploads begun more than `older_than` ago."""
        aborted = 0
        try:
            for upload in await self.bucket.pending_uploads(self.bucket.keys.under("blobs")):
                digest = self._own_upload(upload.key)
                abandoned = time.time() - upload.initiated >= older_than
                if digest is None or not abandoned:
                    continue
                if not await self._upload_live(upload.key, digest):
                    await self.bucket.abort_multipart(upload.key, upload.upload_id)
                    aborted += 1
        except S3_ERRORS as exc:
            log.warning("cannot abort abandoned uploads: %s", type(exc).__name__)
        if aborted:
            log.info("aborted %d abandoned multipart uploads in the bucket", aborted)
        return aborted

    async def verify(self) -> VerifyResult:
        """The local tier, then every object in the bucket. A bucket that fails leaves
        the local tier's result whole, and one line saying what was not verified."""
        local = await super().verify()
        unverified = f"bucket {self.bucket.name} not verified"
        try:
            keys = await self._object_keys()
        except S3_ERRORS as exc:
            return replace(local, unverified=f"{unverified}: cannot list it ({_why(exc)})")
        limit = asyncio.Semaphore(VERIFY_PARALLEL)

        async def check(kind: Kind, key: str) -> str | None:
            async with limit:
                if not self.bucket.up:  # the rest would each wait for it to fail too
                    raise _NotAsked
                return await self._verify_object(kind, key)

        # Every check ends before the report (and the client with it): none left running.
        outcomes = await asyncio.gather(*(check(*found) for found in keys), return_exceptions=True)
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failed:
            if not isinstance(failure, VERIFY_ERRORS):
                raise failure  # a fault of the mirror's own, not the bucket's
        bad = [name for name in outcomes if isinstance(name, str)]
        result = replace(
            local, checked=local.checked + len(keys) - len(failed), removed=[*local.removed, *bad]
        )
        if not failed:
            return result
        cause = next((f for f in failed if not isinstance(f, _NotAsked)), failed[0])
        why = f"{len(failed)} of {len(keys)} objects not read ({_why(cause)})"
        return replace(result, unverified=f"{unverified}: {why}")

    async def _object_keys(self) -> list[tuple[Kind, str]]:
        keys: list[tuple[Kind, str]] = []
        for kind in KINDS:
            async for found in self.bucket.objects(self.bucket.keys.under(kind)):
                keys.append((kind, found.key))
        return keys

    async def _verify_object(self, kind: Kind, key: str) -> str | None:
        """Re-hash one object; delete it when it does not match its key. The bad name."""
        name = self.bucket.keys.name(kind, key)
        digest = as_digest(name)
        if digest is None:
            return None  # not ours: leave it alone
        response = await self.bucket.get(key)
        if response is None:
            return None
        hasher = digest.hasher()
        async with response["Body"] as body:
            while chunk := await body.read(1024 * 1024):
                await asyncio.to_thread(hasher.update, chunk)
        if hasher.hexdigest() == digest.hex:
            return None
        await self.bucket.delete(key)
        if kind == "blobs":
            await self.index.forget(digest)
        return f"{name} (bucket)"


def _why(exc: BaseException) -> str:
    """An exception in a report line: its kind, and what it says when it says anything."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _OwnUpload:
    """An upload of this process: its key counted in `live` until it completes or aborts."""

    def __init__(self, upload: Upload, key: str, live: Counter[str]) -> None:
        self._upload = upload
        self._key = key
        self._live: Counter[str] | None = live
        live[key] += 1

    def progress(self, written: int) -> None:
        self._upload.progress(written)

    async def complete(self) -> None:
        try:
            await self._upload.complete()
        finally:
            self._ended()

    async def abort(self) -> None:
        try:
            await self._upload.abort()
        finally:
            self._ended()

    def _ended(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live[self._key] -= 1
            if live[self._key] <= 0:
                del live[self._key]
