"""A whole bucket object spooled into a temp file of the local tier, sent to the client from it.

The object's bytes go from the GET's socket into the temp file and from the file to the
client by sendfile as they land: nothing goes out through Python, and the local copy,
written anyway, is the buffer. The bucket's pace is not held to the client's: a slow
client reads the file behind the GET. Over plain HTTP the GET is a presigned URL's, its
body spliced into the file inside the kernel (`SplicedSource`, net/splice.py); otherwise
the GetObject's body is written in large batches from a thread (`PiecesSource`).

An object is in the bucket only once its digest matched (see upload.py), so its bytes go
to the client unhashed. The file is hashed after the GET ended, and renamed under the
digest only on a match: a local file is verified as ever. (Hashing 512 MiB takes 0.34
CPU-seconds on a 2-core bench machine, half a direct GET from the bucket: in the client's
path it would take that from RGW and the client.) A mismatch means the object was changed
behind the mirror's back: it is deleted from the bucket too.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from prometheus_client import Counter

from mirror.observe.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.storage.base import StoreReadError
from mirror.storage.filesystem import Storage

log = logging.getLogger(__name__)

# The largest span handed to sendfile at once (counted in the metrics as it goes).
MAX_SPAN = 64 * 1024 * 1024
# Bytes read back per hash update once the object is in.
HASH_READ = 1024 * 1024
# Buffers one pwritev takes at most (Linux's IOV_MAX; EINVAL beyond). A batch received in
# small pieces holds more: 4 MiB from a slow link comes in pieces of a few KiB.
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class SpoolFile:
    """The temp file: its descriptor for writing, and a file object for sendfile."""

    def __init__(self, storage: Storage, fd: int, temp: Path, reader: BinaryIO) -> None:
        self.storage = storage
        self.fd = fd
        self.temp = temp
        self.reader = reader

    @classmethod
    def create(cls, storage: Storage, size: int) -> SpoolFile:
        """A new temp file, `size` bytes reserved (blocking)."""
        fd, temp = storage.new_temp(size)
        try:
            # Locked shared with workers, as a cached blob's reader: once the file is kept
            # under its digest, no process's eviction removes it while it is sent.
            reader = storage.open_reading(temp)
        except OSError:
            storage.discard(fd, temp)
            raise
        return cls(storage, fd, temp, reader)

    def write(self, parts: Sequence[bytes], offset: int) -> int:
        """Write `parts` at `offset`; the bytes written (blocking)."""
        total = sum(len(part) for part in parts)
        views = [memoryview(part) for part in parts]
        written = 0
        while written < total:
            done = os.pwritev(self.fd, views[:IOV_MAX], offset + written)
            written += done
            views = _advance(views, done)
        return total

    def matches(self, digest: Digest) -> bool:
        """Do the file's bytes hash to `digest`? (blocking) One buffer, reused: a fresh
        object per read would be a fresh mapping to fault in, each time."""
        hasher = digest.hasher()
        buffer = bytearray(HASH_READ)
        view = memoryview(buffer)
        offset = 0
        while count := os.preadv(self.fd, [buffer], offset):
            hasher.update(view[:count])
            offset += count
        return hasher.hexdigest() == digest.hex

    def sync(self) -> None:
        """Flush the written bytes to disk (blocking)."""
        os.fsync(self.fd)

    def keep(self, final: Path) -> None:
        """fsync and rename under the blob's name (blocking); the writer fd is closed."""
        fd, self.fd = self.fd, -1
        self.storage.commit(fd, self.temp, final)

    def drop(self) -> None:
        """Close the writer and delete the temp file (blocking); the reader stays open."""
        fd, self.fd = self.fd, -1
        self.storage.discard(None if fd < 0 else fd, self.temp)

    def close_reader(self) -> None:
        self.reader.close()

    def abandon(self) -> None:
        """Drop the file and close its reader: made for a caller that is gone (blocking)."""
        self.drop()
        self.close_reader()


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """The views left after the first `count` bytes (a short write)."""
    while views and count >= len(views[0]):
        count -= len(views[0])
        views = views[1:]
    if views and count:
        views = [views[0][count:], *views[1:]]
    return views


class SpoolSource(Protocol):
    """Where a spool's bytes come from."""

    async def land(self, file: SpoolFile, landed: Callable[[int], None], counted: Counter) -> None:
        """Write the object into `file` from offset 0, calling `landed(bytes in the file)`
        as they land; StoreReadError when the source breaks, OSError when the disk
        refuses. Cancellable: returns only once nothing writes to the file any more."""

    def close(self) -> None:
        """Let go of the connection."""


class BucketSpool:
    """One whole-object GetObject landing in the local tier (see the module docstring)."""

    status = 200
    content_range: str | None = None

    def __init__(
        self,
        length: int,
        source: SpoolSource,
        digest: Digest,
        file: SpoolFile,
        metrics: Metrics,
        on_mismatch: Callable[[], Coroutine[None, None, None]],
        on_close: Callable[[], None],
        on_settled: Callable[[], None],
        in_background: Callable[[Coroutine[None, None, None]], None],
    ) -> None:
        self.length = length
        self.written = 0
        self.error: StoreReadError | None = None
        self._source = source
        self._digest = digest
        self._file = file
        self._metrics = metrics
        self._on_mismatch = on_mismatch
        self._on_close = on_close
        self._on_settled = on_settled  # kept or dropped: another read may fill the tier now
        self._in_background = in_background
        self._progress = asyncio.Event()
        # Closing cancels the copy alone: the run around it still drops the file (a
        # cancelled thread hop would never run).
        self._copying = asyncio.create_task(self._copy())
        self._run_task = asyncio.create_task(self._run())

    @property
    def file(self) -> BinaryIO:
        """The spooled bytes, for sendfile: valid until `close`."""
        return self._file.reader

    async def spans(self) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) spans of the file as its bytes land; StoreReadError when they
        stop coming."""
        pos = 0
        while pos < self.length:
            if self.error is not None:
                raise self.error
            landed = min(self.written, self.length)
            if landed <= pos:
                await self._progress.wait()
                continue
            length = min(MAX_SPAN, landed - pos)
            yield pos, length
            pos += length

    async def close(self) -> None:
        """The client is done (or gone): stop the GET unless it finished."""
        try:
            # Every byte landed: the copy has only the body's end to read, and cancelling
            # it there would drop a whole file. Else it is stopped (nothing, once it ended).
            if self.written < self.length:
                self._copying.cancel()
            await asyncio.shield(self._run_task)
        finally:
            self._source.close()
            await asyncio.to_thread(self._file.close_reader)
            self._on_close()

    def _notify(self) -> None:
        # A fresh event each time, so that a waiter wakes once per change.
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        """Body → file; the whole object in, the file verified (and kept) in the background."""
        try:
            await self._copying
        except asyncio.CancelledError:
            await self._drop("bucket read stopped")
            if self._run_task.cancelling():
                raise  # this task itself, not only the copy: the loop is shutting down
            return
        except StoreReadError as exc:
            await self._drop(str(exc))
            return
        except OSError as exc:  # the local tier's disk refused the bytes
            self._file.storage.mark_unwritable(exc)
            await self._drop("local tier write failed")
            return
        except Exception as exc:  # whatever it was, the client must not wait for more
            log.warning("bucket read of %s broke", self._digest, exc_info=True)
            await self._drop(f"bucket read broke: {type(exc).__name__}")
            return
        self._in_background(self._keep_if_matching())

    async def _drop(self, reason: str) -> None:
        self.error = StoreReadError(reason)
        self._notify()
        try:
            await asyncio.to_thread(self._file.drop)
        finally:
            self._on_settled()

    async def _copy(self) -> None:
        await self._source.land(self._file, self._landed, self._metrics.s3_bytes.labels("received"))
        if self.written != self.length:
            raise StoreReadError(f"bucket sent {self.written} of {self.length} bytes")

    def _landed(self, written: int) -> None:
        self.written = written
        self._notify()

    async def _keep_if_matching(self) -> None:
        """Hash the file; on a match fsync and rename it under its digest, else drop it
        and the bucket's object."""
        try:
            await self._verify_and_keep()
        finally:
            self._on_settled()

    async def _verify_and_keep(self) -> None:
        file = self._file
        # The file goes to disk while it is hashed (one waits on the disk, the other on
        # the CPU), so that it is in the local tier about as soon as it is verified.
        matched, synced = await asyncio.gather(
            asyncio.to_thread(file.matches, self._digest),
            asyncio.to_thread(file.sync),
            return_exceptions=True,
        )
        if matched is False:
            self._metrics.digest_mismatches.labels("blob").inc()
            log.error("bucket object for %s does not match it: deleted", self._digest)
            await asyncio.to_thread(file.drop)
            await self._on_mismatch()
            return
        try:
            for outcome in (matched, synced):
                if isinstance(outcome, BaseException):
                    raise outcome
            await asyncio.to_thread(file.keep, file.storage.blob_path(self._digest))
        except OSError as exc:
            file.storage.mark_unwritable(exc)
            await asyncio.to_thread(file.drop)
            return
        if file.storage.on_landed is not None:  # in the local tier now: the eviction counts it
            file.storage.on_landed(self.length)
