"""Blob downloads from upstream: one per digest, however many clients ask at once.

A `Download` is a task of its own, not tied to any client: it writes the upstream body
into a temp file, hashing as it goes, and renames the file under its digest only when the
hash matches. Every client of that blob, the first and the late joiners alike, tails the
temp file from its own offset, waking on each chunk written. A client that goes away
cancels nothing; a download that fails wakes every reader with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from mirror.cluster.blobflight import BlobFlight
from mirror.cluster.lease import Lease
from mirror.observe.logs import FailureLog
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    BlobTooLarge,
    BlobUnknown,
    DigestMismatch,
    RegistryError,
    UpstreamUnavailable,
)
from mirror.oci.reference import Digest
from mirror.storage import CacheStore
from mirror.storage.base import NO_SPACE, NoUpload, Upload
from mirror.storage.localflight import (
    Claim,
    Gone,
    LocalFlight,
    Progress,
    Sibling,
    held_off_loop,
    reopen,
)
from mirror.upstream.body import BODY_ERRORS, BlobBody, Pace, TooLong
from mirror.upstream.client import Upstream
from mirror.util.lru import LRU
from mirror.util.settle import in_thread, in_threads, settled
from mirror.util.threadfiles import open_off_loop, owned_off_loop

log = logging.getLogger(__name__)

# Disk reserved ahead of a download's bytes, the rest as they come: an upstream's
# Content-Length holds no more of the disk than this before its bytes arrive.
RESERVE_AHEAD = 64 * 1024 * 1024
# Bytes gathered from the socket before one write (and hash) in a worker thread: large
# enough that thread hand-offs cost little, small enough that readers see steady progress.
WRITE_CHUNK = 1024 * 1024
# Received pieces held for one write at most: a peer sending tiny pieces makes more writes,
# not a longer list.
MAX_PIECES = 1024
# Largest span handed to one sendfile call, so that readers of one blob take turns.
MAX_SPAN = 16 * 1024 * 1024
MIN_SPAN = 4 * 1024 * 1024
# How long a stopping mirror lets verified downloads finish their commit and upload, and
# the others remove their temp files and abort their uploads (the supervisor's grace past
# `shutdown_timeout` is budgeted for it).
FINISH_ON_CLOSE = 10.0
# Resumes in a row that bring no new byte before the transfer is given up.
MAX_FRUITLESS_RESUMES = 3
# How often a process following another one's download (workers) reads its progress.
FOLLOW_POLL = 0.03
# The process fetching a blob for the others touches its claim's file this often (seconds)
# while it holds it, however slowly the bytes come, and while it commits and uploads: its
# sign of life.
BEAT_EVERY = 5.0
# A claim's file untouched this long (seconds) is held by a process that is alive (else the
# kernel had dropped its lock) but stopped: a stuck event loop, a stopped process. Its own
# rules never fire; its followers stop waiting and relay from the upstream.
FOLLOW_STALL = 60.0
# Blobs sent without a length that grew past what the cache holds, remembered so that the
# next pull relays them at once rather than filling tmp/ again to learn it.
OVERSIZED_ENTRIES = 1000


class TransferBroken(Exception):
    """The upstream body stopped before its end (cut, reset, stalled past read_timeout)."""


class CacheWriteFailed(UpstreamUnavailable):
    """The disk refused the download's bytes (full, read-only): readers must carry on
    from upstream by themselves."""


class Uncacheable(UpstreamUnavailable):
    """This blob cannot go into the cache now (too large, or the disk takes no writes):
    every waiting client streams it straight from upstream instead."""


class OutgrewCache(CacheWriteFailed, Uncacheable):
    """A blob sent without a length grew past what the cache may hold: readers carry on
    from upstream, and the cache stays writable for every other blob."""


class DiskFull(CacheWriteFailed):
    """The disk ran out of space under this download. Whether the cache as a whole takes
    no writes is probed once its temp file is gone: one huge blob must not say so."""

    def __init__(self, message: str, error: OSError) -> None:
        super().__init__(message)
        self.error = error


class StoredElsewhere(Uncacheable):
    """Another replica stored the blob while this one took its lease: readers take it
    from the store (or, should it be gone again, straight from upstream)."""


class Download:
    """One blob on its way from upstream into the store."""

    def __init__(
        self, digest: Digest, final: Path, open_reading: Callable[[Path], BinaryIO]
    ) -> None:
        self.digest = digest
        self.final = final
        # How a reader opens the file: with workers, locked so that no eviction removes it.
        self._open_reading = open_reading
        self.temp: Path | None = None
        self.size: int | None = None
        self.written = 0
        self.reserved = 0  # bytes of the temp file's disk reserved so far (RESERVE_AHEAD)
        self.verified = False  # every byte arrived and the hash matched: readers may finish
        # ... and the file is in the cache under its digest, its copy in the bucket (if
        # any) completed or given up
        self.done = False
        self.error: BaseException | None = None
        # The copy of the temp file the store keeps elsewhere too (the bucket), if any.
        self.upload: Upload = NoUpload()
        # The replica this one streams the blob from (a cluster's lease holder), or None:
        # the bytes come from the upstream.
        self.peer: str | None = None
        self.lease: Lease | None = None  # the blob's lease, while this replica holds it
        # The upstream it was started for, and whether every byte so far came from it to
        # this process (not from a peer, nor a file taken over): then that upstream sent it.
        self.upstream = ""
        self.from_upstream = False
        # Workers: this process's claim on the blob, while it fetches it for all of them.
        self.claim: Claim | None = None
        self._started = asyncio.Event()
        self._progress = asyncio.Event()

    def _notify(self) -> None:
        # Swap in a fresh event so that each waiter wakes once per change.
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._started.set()
        self._notify()

    def _landed(self, size: int) -> None:
        """The blob turned out to be in the cache already: readers take it from there."""
        self.size = self.written = size
        self.verified = self.done = True
        self._started.set()
        self._notify()

    async def started(self) -> None:
        """Wait for the upstream's response headers; raise if the download failed first."""
        await self._started.wait()
        if self.error is not None and self.temp is None:
            raise self.error

    async def finished(self) -> None:
        """Wait until the blob is stored (in the bucket too, unless its upload failed);
        raise if the download failed."""
        while not self.done and self.error is None:
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def _wait_beyond(self, offset: int) -> None:
        while self.written <= offset and not self.verified and self.error is None:
            await self._progress.wait()

    async def spans(self, start: int, end: int | None) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) spans of bytes `start`..`end` (inclusive; None: to the end)
        that are in the file, as they arrive; send them from `open_file()`.

        The blob's last byte is held back until the digest is verified, so a client never
        gets a complete-looking body with wrong bytes: on a mismatch it sees a short one.
        """
        pos = start
        while end is None or pos <= end:
            await self._wait_beyond(pos)
            if self.error is not None:
                raise self.error
            limit = self.written if self.verified else self.written - 1
            if self.size is not None:  # whatever the file holds, the blob ends there
                limit = min(limit, self.size if self.verified else self.size - 1)
            if end is not None:
                limit = min(limit, end + 1)
            if pos >= limit:
                if self.verified:
                    return
                await self._progress.wait()
                continue
            range_done = end is not None and limit == end + 1
            if limit - pos < MIN_SPAN and pos > start and not (self.verified or range_done):
                # Caught up with the download: let a few megabytes gather first, so eight
                # readers make a few large sendfile calls rather than thousands of small ones.
                await self._progress.wait()
                continue
            length = min(MAX_SPAN, limit - pos)
            yield pos, length
            pos += length

    async def open_file(self) -> BinaryIO:
        """The blob's file (temp or final), opened for reading (the caller closes it)."""
        return await open_off_loop(self._open_for_reading)

    def _open_for_reading(self) -> BinaryIO:
        # The temp file may already have been renamed into place by the time we open it.
        if self.temp is not None:
            try:
                return self._open_reading(self.temp)  # closed by the caller
            except FileNotFoundError:
                pass
        if self.error is not None:
            raise self.error
        return self._open_reading(self.final)  # closed by the caller


class Downloads:
    """The downloads under way, by digest: the single-flight point of the mirror."""

    def __init__(
        self,
        storage: CacheStore,
        metrics: Metrics,
        flight: BlobFlight | None = None,
        local: LocalFlight | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        # Upstream failures go to the one rate-limited log the error middleware writes to:
        # the error its clients get is the same object, so it is logged once.
        self._failures = failures
        self._flight = flight  # replicas: one of them fetches each blob (cluster/blobflight.py)
        # Workers: one process of this host fetches each blob, the others follow its file
        # (storage/localflight.py); only that one asks `flight` or the upstream.
        self._local = local
        self._active: dict[Digest, Download] = {}
        self._tasks: dict[asyncio.Task[None], Download] = {}
        # Called after each blob lands in the cache (the evictor counts it, and shows the
        # cache's size from its count).
        self.on_commit: Callable[[int], None] | None = None
        # Told the size of a blob that fits the bound but found no room on the disk.
        self.on_no_room: Callable[[int], None] | None = None
        # Told which upstream sent a blob it landed (cache/holdings.py serves cached bytes
        # under an upstream only once that upstream sent them).
        self.on_sent: Callable[[str, Digest], Awaitable[None]] | None = None
        # digest → the bytes it had reached when it outgrew the cache (OutgrewCache).
        self._oversized: LRU[Digest, int] = LRU(OVERSIZED_ENTRIES)

    def get(self, digest: Digest) -> Download | None:
        return self._active.get(digest)

    @property
    def shared(self) -> bool:
        """Whether a download may take its bytes from another replica or worker process
        (whose fetch may be for another repository), not the upstream."""
        return self._flight is not None or self._local is not None

    def start_or_join(self, upstream: Upstream, repo: str, digest: Digest) -> Download:
        """The download of `digest` under way, or a new one started for it."""
        download = self._active.get(digest)
        if download is not None:
            self._metrics.joined_requests.inc()
            return download
        download = Download(digest, self._storage.blob_path(digest), self._storage.open_reading)
        download.upstream = upstream.name
        self._active[digest] = download
        task = asyncio.create_task(self._run(download, upstream, repo))
        self._tasks[task] = download
        task.add_done_callback(self._done)
        return download

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def close(self) -> None:
        """Cancel every download still fetching (their temp files are removed) and wait for
        them. One whose bytes are all in and verified may finish storing first, for a
        while: its file is renamed at once, but cancelled before its upload completes, it
        would leave a whole blob out of the bucket, which other replicas would fetch again."""
        finishing = [task for task, download in self._tasks.items() if download.verified]
        for task in list(self._tasks):
            if task not in finishing:
                task.cancel()
        # Those cancelled clean up (temp file, multipart upload) meanwhile: cancelled
        # again, that would be cut short, and leave what it was removing.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=FINISH_ON_CLOSE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _report(
        self, download: Download, upstream: Upstream, repo: str, error: RegistryError
    ) -> None:
        """One WARNING for a failed download: an upstream's failure in the shared,
        rate-limited log (its clients' error is the same object: logged once)."""
        if error.from_upstream and self._failures is not None:
            cause = f"blob {download.digest}: {error.message}"
            self._failures.warn(upstream.name, repo, error, cause)
        else:
            log.warning("blob %s download failed: %s", download.digest, error.message)

    async def _run(self, download: Download, upstream: Upstream, repo: str) -> None:
        # In flight once this process is the one to fetch: following another worker's
        # download is that worker's fetch, counted there (the gauge is summed over them).
        in_flight = self._metrics.upstream_fetches_in_flight
        fetching = False
        started = time.monotonic()
        fd: int | None = None
        owned: Path | None = None  # the temp file is this process's to remove on failure
        # The blob's lease, when this replica holds it: released once the blob is stored
        # (or the download failed), so a replica that takes it next finds the object.
        held = contextlib.AsyncExitStack()
        try:
            # A request that found no file can reach `start_or_join` just after an earlier
            # download of the same blob landed and left: serve the file, fetch nothing.
            landed = await self._storage.blob_size(download.digest)
            if landed is not None:
                download._landed(landed)
                return
            reached = self._oversized.get(download.digest)
            if reached is not None and not self._storage.fits(reached):
                raise Uncacheable(f"blob {download.digest} is larger than the cache")
            hasher = download.digest.hasher()
            if self._local is not None and not await self._take_locally(download, held):
                return  # another process fetched it
            in_flight.inc()
            fetching = True
            if download.claim is not None and download.claim.previous is not None:
                fd = await self._adopt(download, download.claim.previous, hasher)
                owned = download.temp
            if fd is None or download.written != download.size:
                body = await self._open(download, upstream, repo, held)
                if fd is None:
                    try:
                        fd = await self._new_temp(download, body)
                    except BaseException:  # cancelled too: the connection is let go
                        body.release()
                        raise
                    owned = download.temp
                download._started.set()
                await self._copy_resuming(body, fd, hasher, download, upstream, repo, held)
            self._verify(download, hasher.hexdigest())
            # Recorded before any client has its last byte: a request that comes once it
            # has (under another repository) finds the upstream's word for the bytes, and
            # is not sent to fetch them again to check them.
            await self._sent(download)
            # The bytes are right: clients may have their last byte now. The fsync that
            # makes the file durable (seconds, for a big layer) need not hold them up.
            download.verified = True
            if download.claim is not None:
                await in_thread(download.claim.verified)
            download._notify()
            opened, fd = fd, None  # commit closes it, whatever happens
            assert download.temp is not None
            # To its end even if cancelled (a stop): else the failure's cleanup would remove
            # the temp file under the rename, and a verified blob be lost.
            commit = functools.partial(self._storage.commit, opened, download.temp, download.final)
            await in_thread(commit)
        except BaseException as exc:
            await self._failed(download, exc, fd, owned, upstream, repo)
            if not isinstance(exc, Exception):
                raise
        else:  # cached: a stop while the bucket's copy is finished fails nothing
            self._committed(download, started, upstream)
            await self._finish_upload(download)
        finally:
            self._forget(download)
            await held.aclose()
            if fetching:
                in_flight.dec()

    async def _failed(
        self,
        download: Download,
        exc: BaseException,
        fd: int | None,
        owned: Path | None,
        upstream: Upstream,
        repo: str,
    ) -> None:
        """The download failed (or was stopped) before its file was renamed: tell its
        readers and followers, drop its temp file and upload."""
        # Forget it before anything is awaited: a request that comes in once the readers
        # have seen the failure must start afresh, not join a download that is over.
        self._forget(download)
        error = _as_registry_error(exc)
        download._fail(error)
        await self._tell_followers(download, exc, error)
        # To its end even if cancelled: a queued thread call that is cancelled never runs.
        await in_thread(functools.partial(self._storage.discard, fd, owned))
        await download.upload.abort()
        if isinstance(exc, DiskFull):
            await self._write_refused(exc.error)
        if isinstance(exc, Exception) and not isinstance(exc, Uncacheable | BlobUnknown):
            self._report(download, upstream, repo, error)  # those two are not failures

    async def _tell_followers(
        self, download: Download, exc: BaseException, error: RegistryError
    ) -> None:
        """An upstream failure, for the processes following this download (not a stop:
        a process shutting down must not fail the others' clients)."""
        claim = download.claim
        if claim is not None and isinstance(exc, Exception) and _shared(error):
            await asyncio.to_thread(claim.failed, type(error).__name__, error.message)

    async def _new_temp(self, download: Download, body: BlobBody) -> int:
        """The temp file the body goes to, its space reserved (published to the other
        processes when they follow this one)."""
        download.size = body.total
        if not self._storage.fits(download.size):
            body.release()
            raise Uncacheable(f"blob {download.digest} is larger than the cache")
        try:
            fd, temp = await owned_off_loop(
                functools.partial(self._storage.new_temp, download.size, RESERVE_AHEAD),
                lambda made: self._storage.discard(*made),
            )
        except OSError as exc:
            body.release()
            await self._write_refused(exc)
            if exc.errno in NO_SPACE and download.size and self.on_no_room is not None:
                self.on_no_room(download.size)
            raise Uncacheable(f"blob {download.digest} cannot be written to the cache") from None
        download.temp = temp
        download.reserved = min(download.size or 0, RESERVE_AHEAD)
        if download.peer is None:  # whoever fetches from upstream stores in the bucket
            download.upload = self._storage.start_upload(download.digest, download.size, temp)
        if download.claim is not None:
            start = functools.partial(download.claim.start, temp, download.size)
            await self._started_or_dropped(start, fd, temp)
        return fd

    async def _started_or_dropped(self, start: Callable[[], None], fd: int, temp: Path) -> None:
        """`start()` (the download's start, told to the other processes); failed or
        cancelled, the temp file is closed and removed here: its caller has no descriptor
        to drop yet."""
        try:
            await in_thread(start)
        except BaseException:
            await in_thread(functools.partial(self._storage.discard, fd, temp))
            raise

    async def _take_locally(self, download: Download, held: contextlib.AsyncExitStack) -> bool:
        """Claim the blob among the processes of this host: True once this one is to fetch
        it (`download.claim`); False when another one's download left it in the cache."""
        local = self._local
        assert local is not None
        joined = False
        while True:
            try:
                claimed = await held_off_loop(lambda: local.claim(download.digest))
            except OSError as exc:  # tmp/ takes no lock file (read-only, full): relayed
                await self._write_refused(exc)
                raise Uncacheable(f"blob {download.digest} cannot be claimed here") from None
            if isinstance(claimed, Sibling) and not joined:
                joined = True  # another process's download, as a request joins one here
                self._metrics.joined_requests.inc()
            got = await self._follow(download, claimed) if isinstance(claimed, Sibling) else claimed
            if isinstance(got, Claim):
                held.push_async_callback(asyncio.to_thread, got.release)
                await held.enter_async_context(_beating(got))  # stops before the release
                download.claim = got
            landed = await self._storage.blob_size(download.digest)
            if landed is not None:  # stored before this claim, or by the one followed
                download._landed(landed)
                return False
            if isinstance(got, Claim):
                return True
            failed = await asyncio.to_thread(local.failure, download.digest)
            if failed is not None:  # the one followed failed upstream just now: so do these
                raise _failure_from(*failed)
            if download.temp is not None:  # its readers hold that file: no other will do
                # Not the upstream's failure (that leaves a marker): its disk's, or it was
                # stopped. The readers carry on from the upstream, as the owner's do.
                raise CacheWriteFailed(f"blob {download.digest}: another process failed it")

    async def _follow(self, download: Download, sibling: Sibling) -> Claim | Gone:
        """Mirror another process's progress into `download` (its readers send the bytes
        from that process's temp file) until it lets go: Gone, or its claim, ours now;
        Uncacheable or CacheWriteFailed (relayed) when that process stopped altogether."""
        looked_at = 0.0
        try:
            while True:
                got = await held_off_loop(sibling.poll)
                if isinstance(got, Progress):
                    _mirror(download, got)
                elif got is not None:
                    return got
                if time.monotonic() - looked_at >= 1.0:  # its sign of life, once a second
                    looked_at = time.monotonic()
                    if time.time() - await held_off_loop(sibling.beat) > FOLLOW_STALL:
                        raise self._stalled(download)
                await asyncio.sleep(FOLLOW_POLL)
        finally:
            sibling.close()  # a lock file's descriptor: closing it touches no disk

    @staticmethod
    def _stalled(download: Download) -> Exception:
        message = (
            f"blob {download.digest}: the process fetching it has not been seen at work "
            f"for {FOLLOW_STALL:.0f}s"
        )
        if download.temp is None:  # no byte followed yet: every client relayed
            return Uncacheable(message)
        return CacheWriteFailed(message)  # the readers carry on from the upstream

    async def _adopt(
        self, download: Download, previous: Progress, hasher: hashlib._Hash
    ) -> int | None:
        """Carry on the download of a process that died: its good bytes re-hashed, the
        rest fetched from where they stop (or from 0 when the size is unknown); None
        when its file cannot be read back (then start afresh)."""
        written = previous.written if previous.size is not None else 0
        try:
            fd = await owned_off_loop(
                functools.partial(reopen, previous.temp, written, hasher), os.close
            )
        except OSError as exc:
            log.warning("blob %s: cannot take over %s: %s", download.digest, previous.temp, exc)
            if download.temp is not None:  # followed until now: its readers hold that file
                raise UpstreamUnavailable(f"blob {download.digest}: cannot take it over") from None
            return None
        download.temp, download.size, download.written = previous.temp, previous.size, written
        download.upload = self._storage.start_upload(download.digest, download.size, previous.temp)
        download.upload.progress(written)
        assert download.claim is not None
        start = functools.partial(download.claim.start, previous.temp, download.size, written)
        await self._started_or_dropped(start, fd, previous.temp)
        download._started.set()
        download._notify()
        log.info(
            "blob %s: taken over from a process that stopped at byte %d", download.digest, written
        )
        return fd

    async def _write_refused(self, exc: OSError) -> None:
        """Mark the cache unwritable for a refused write, unless it was for want of space
        and a small file still goes in (with this blob's temp file gone): then only this
        blob did not fit, and the cache goes on taking the others."""
        if exc.errno in NO_SPACE and await self._storage.is_writable():
            return
        self._storage.mark_unwritable(exc)

    def _forget(self, download: Download) -> None:
        # Only this download: a new one for the same digest may have taken its place.
        if self._active.get(download.digest) is download:
            del self._active[download.digest]

    async def _sent(self, download: Download) -> None:
        """Record that the upstream sent the blob, when every byte came from it here."""
        if not download.from_upstream or self.on_sent is None:
            return
        try:
            await self.on_sent(download.upstream, download.digest)
        except Exception as exc:  # the blob is stored: a later request asks the upstream again
            log.warning("blob %s: its source not recorded: %s", download.digest, exc)

    def _committed(self, download: Download, started: float, upstream: Upstream) -> None:
        if self.on_commit is not None:
            self.on_commit(download.written)
        seconds = time.monotonic() - started
        log.info(
            "blob %s cached: %d bytes from %s in %.2fs (%.0f MB/s)", download.digest,
            download.written, download.peer or upstream.name, seconds,
            download.written / seconds / 1e6,
        )  # fmt: skip

    async def _finish_upload(self, download: Download) -> None:
        """Complete the bucket's copy, after the local rename: a bucket that is slow, or
        hangs until its calls' deadlines, never holds a verified blob out of the local
        tier (nor a stop throws it away). The blob's lease and claim are held until the
        copy is complete, so other replicas and workers find it there. A mirror killed
        meanwhile leaves the blob in the local tier only, served from there (as after any
        failed upload), and an open upload that is aborted as abandoned."""
        try:
            await download.upload.complete()
        except BaseException:  # a stop: nothing of it left open
            await download.upload.abort()
            raise
        finally:
            download.done = True
            download._notify()

    async def _copy_resuming(
        self,
        body: BlobBody,
        fd: int,
        hasher: hashlib._Hash,
        download: Download,
        upstream: Upstream,
        repo: str,
        held: contextlib.AsyncExitStack,
    ) -> None:
        """Copy the body; when the transfer breaks, resume it with Range where it stopped.
        The pace is the whole download's: a sender that cuts each body after a few bytes
        is as slow as one that trickles them."""
        fruitless = 0
        pace = Pace()
        while True:
            before = download.written
            try:
                async with body:
                    await self._copy(body, fd, hasher, download, upstream.name, pace)
                return
            except TransferBroken as exc:
                if download.peer is None:
                    upstream.record_failure()
                fruitless = 0 if download.written > before else fruitless + 1
                if download.size is None or fruitless > MAX_FRUITLESS_RESUMES:
                    raise UpstreamUnavailable(str(exc)) from None
                pace.count(0, download.peer or upstream.name)
            body = await self._open(download, upstream, repo, held)

    async def _open(
        self,
        download: Download,
        upstream: Upstream,
        repo: str,
        held: contextlib.AsyncExitStack,
    ) -> BlobBody:
        """The blob's body from byte `download.written`: from the upstream, or, among
        replicas, from the one holding the blob's lease while one does. A body that says
        the blob has another size than the one its file was started for is refused."""
        body = await self._source(download, upstream, repo, held)
        size, total = download.size, body.total
        if size is not None and total is not None and total != size:
            body.release()
            raise UpstreamUnavailable(
                f"blob {download.digest} was said to be {size} bytes, now {total}"
            )
        return body

    async def _source(
        self,
        download: Download,
        upstream: Upstream,
        repo: str,
        held: contextlib.AsyncExitStack,
    ) -> BlobBody:
        if self._flight is not None and download.lease is None:
            got = await self._flight.source(download.digest, download.written, download.peer)
            if got is not None and not isinstance(got, Lease):  # the owner's stream
                download.peer = got.owner
                download.from_upstream = False
                return got.body
            if isinstance(got, Lease):
                download.lease = await held.enter_async_context(got.kept())
                if download.temp is None and await self._stored(download.digest):
                    raise StoredElsewhere(f"blob {download.digest} was stored meanwhile")
            self._fetch_here(download)
        return await self._from_upstream(upstream, repo, download)

    def _fetch_here(self, download: Download) -> None:
        """From now on this replica fetches the blob from upstream. One that followed an
        owner (and took over) stores it too: the upload catches up with the file first."""
        if download.peer is not None and download.temp is not None:
            download.upload = self._storage.start_upload(
                download.digest, download.size, download.temp
            )
            download.upload.progress(download.written)
        download.peer = None

    async def _stored(self, digest: Digest) -> bool:
        """In the store already (another replica finished just before this one's lease)?"""
        if await self._storage.blob_size(digest) is not None:
            return True
        return await self._storage.find_blob(digest, None, head=True) is not None

    async def _from_upstream(self, upstream: Upstream, repo: str, download: Download) -> BlobBody:
        body = await upstream.open_blob(repo, str(download.digest), offset=download.written)
        if download.written == 0:
            download.from_upstream = True
        # Nothing written yet (aiohttp drops what it buffered when the connection breaks):
        # a body from byte 0 starts over, which is just as good.
        if download.written == 0 and body.offset == 0:
            return body
        if body.offset != download.written:
            body.release()
            raise UpstreamUnavailable(
                f"blob {download.digest} broke at byte {download.written} and the upstream "
                "cannot resume it"
            )
        self._metrics.resumed_transfers.inc()
        log.info("resuming blob %s at byte %d", download.digest, download.written)
        return body

    async def _copy(
        self,
        body: BlobBody,
        fd: int,
        hasher: hashlib._Hash,
        download: Download,
        upstream: str,
        pace: Pace,
    ) -> None:
        """Body → file. One write is in flight while the next megabyte is read: the disk
        and the socket work at the same time, and memory stays at two buffers."""
        pending: asyncio.Future[None] | None = None

        async def flush(data: bytes) -> None:
            nonlocal pending
            if pending is not None:
                await pending  # in order, so the hash sees the bytes in order
                pending = None
            if data:
                pending = asyncio.ensure_future(self._flush(fd, hasher, data, download, upstream))

        # The pieces as received, joined once per write: one copy, where a growing
        # bytearray copies again each time it reallocates.
        pieces: list[bytes] = []
        held = 0
        try:
            async for chunk in body.chunks(pace=pace):
                pieces.append(chunk)
                held += len(chunk)
                if held >= WRITE_CHUNK or len(pieces) >= MAX_PIECES:
                    await flush(b"".join(pieces))
                    pieces, held = [], 0
        except BODY_ERRORS as exc:
            # What did arrive is good: keep it, so a resume starts after it.
            await flush(b"".join(pieces))
            await flush(b"")
            raise TransferBroken(
                f"blob {download.digest} transfer from upstream broke at byte "
                f"{download.written}: {type(exc).__name__}"
            ) from None
        finally:
            if pending is not None:  # an error or cancellation: let the write settle
                await settled(pending)
        await flush(b"".join(pieces))
        await flush(b"")

    async def _flush(
        self, fd: int, hasher: hashlib._Hash, data: bytes, download: Download, upstream: str
    ) -> None:
        claim, reached = download.claim, download.written + len(data)
        if download.size is not None and reached > download.size:
            # Whatever its headers said of this body: not one byte past the blob's size
            # goes to the disk, nor to a client.
            raise TooLong(
                f"blob {download.digest}: {download.peer or upstream} sent more than its "
                f"{download.size} bytes"
            )
        if download.size is None and not self._storage.fits(reached):
            # No length was sent: only now is it known that the blob outgrew the cache.
            self._oversized.put(download.digest, reached)
            raise OutgrewCache(f"blob {download.digest} grew larger than the cache")
        publish = None if claim is None else lambda: claim.progress(reached)
        reserve = self._reserve_ahead(fd, download, reached)
        try:
            # Two threads: hashing and writing run side by side (both release the GIL).
            # Awaited to their end even if cancelled: the caller then closes `fd`.
            await in_threads(
                functools.partial(hasher.update, data),
                functools.partial(_write_all, fd, data, publish, reserve),
            )
        except OSError as exc:
            if exc.errno in NO_SPACE:  # judged once the temp file is gone (_write_refused)
                raise DiskFull(f"cache write failed: {exc.strerror}", exc) from None
            self._storage.mark_unwritable(exc)
            raise CacheWriteFailed(f"cache write failed: {exc.strerror}") from None
        download.written += len(data)
        download.upload.progress(download.written)
        if download.peer is None:
            self._metrics.upstream_bytes.labels(upstream).inc(len(data))
        else:
            self._metrics.cluster.peer_bytes.labels("in").inc(len(data))
        download._notify()

    def _reserve_ahead(
        self, fd: int, download: Download, reached: int
    ) -> Callable[[], None] | None:
        """The reservation of the next RESERVE_AHEAD bytes, once a write goes past what is
        reserved (run in the write's thread, before it)."""
        if download.size is None or reached <= download.reserved:
            return None
        start, upto = download.reserved, min(download.size, reached + RESERVE_AHEAD)
        download.reserved = upto
        storage, temp = self._storage, download.temp
        assert temp is not None
        return lambda: storage.reserve(fd, temp, start, upto - start)

    def _verify(self, download: Download, hexdigest: str) -> None:
        if download.size is not None and download.written != download.size:
            raise UpstreamUnavailable(
                f"blob {download.digest}: upstream sent {download.written} of {download.size} bytes"
            )
        if hexdigest != download.digest.hex:
            self._metrics.digest_mismatches.labels("blob").inc()
            raise DigestMismatch(f"upstream bytes for blob {download.digest} do not match it")


def _write_all(
    fd: int,
    data: bytes,
    then: Callable[[], None] | None = None,
    first: Callable[[], None] | None = None,
) -> None:
    if first is not None:
        first()
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if then is not None:  # the bytes are in the file: other processes may read them now
        then()


@contextlib.asynccontextmanager
async def _beating(claim: Claim) -> AsyncIterator[None]:
    """Touch the claim's file now and every BEAT_EVERY while the block runs: the followers'
    sign that this process is at work, however slowly its bytes come (a lock file left
    by a dead owner and claimed again may be old)."""

    async def beat() -> None:
        while True:
            with contextlib.suppress(OSError):
                await in_thread(claim.beat)
            await asyncio.sleep(BEAT_EVERY)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _mirror(download: Download, progress: Progress) -> None:
    """Another process's published progress, taken into the download its readers follow."""
    # Its bytes past the size would reach no client, but the file is not the blob.
    if progress.size is not None and progress.written > progress.size:
        raise UpstreamUnavailable(f"blob {download.digest}: another process wrote past its size")
    if download.temp is None:
        download.temp, download.size = progress.temp, progress.size
        download._started.set()
    elif progress.temp != download.temp:
        raise UpstreamUnavailable(f"blob {download.digest}: another process restarted it")
    if progress.written > download.written or progress.verified > download.verified:
        download.written = max(download.written, progress.written)
        download.verified = progress.verified
        download._notify()


def _shared(error: RegistryError) -> bool:
    """Is this failure the upstream's, which the processes following this download would
    meet too (not this process's disk, nor a blob too large for its cache)? A follower
    told of none relays from the upstream itself (downloads' `_take_locally`)."""
    if isinstance(error, CacheWriteFailed | Uncacheable):
        return False
    return isinstance(error, BlobUnknown | UpstreamUnavailable) or error.from_upstream


def _failure_from(kind: str, message: str) -> RegistryError:
    """Another process's failure, as this process's clients get it."""
    if kind == BlobUnknown.__name__:
        return BlobUnknown(message)
    if kind == BlobTooLarge.__name__:  # no outage: asking again gets the same answer
        return BlobTooLarge(message)
    return UpstreamUnavailable(message)


def _as_registry_error(exc: BaseException) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return UpstreamUnavailable("the mirror is shutting down")
    return UpstreamUnavailable(f"blob download failed: {type(exc).__name__}")
