"""A download's temp file copied into the bucket while it is written.

Parts are read back from the temp file (not kept from the stream) into one of
PARTS_IN_FLIGHT buffers shared by every upload of the process (`PartBuffers`): memory
stays bounded however many cold blobs arrive together. An upload that waits for a buffer
falls behind its download; nothing piles up, as the file holds the bytes. The object
becomes visible only in `complete`, which the download calls after the digest matched
(and after its file was renamed into the local tier: then it is read from there);
anything else ends in AbortMultipartUpload. A blob smaller than one part goes up in one
PutObject at the end. Each call is held to a deadline (bucket.py), and once the bucket is
known to be down no more parts are sent: the upload ends, aborted when the bucket answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from mirror.storage.s3.bucket import Bucket, BucketUnavailable
from mirror.storage.s3.partbody import PartBody
from mirror.util.threadfiles import close_off_loop, open_off_loop

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART = 8 * MiB
# S3 allows 10,000 parts per upload: parts grow with the blob so that any size fits.
MAX_PARTS = 10_000
# A blob of unknown size (no Content-Length upstream) still fits up to 160 GiB.
UNKNOWN_SIZE_PART = 16 * MiB
# Parts read and being sent at once, process-wide: each holds one buffer of its part size,
# 8 MiB for blobs under 80 GiB.
PARTS_IN_FLIGHT = 2
# Buffers nobody has used for this long are let go (seconds): an idle mirror holds none.
KEEP_IDLE = 30.0


def part_size(size: int | None) -> int:
    """Bytes per part: at least 8 MiB, whole MiB, and at most 10,000 parts for `size`."""
    if size is None:
        return UNKNOWN_SIZE_PART
    return max(MIN_PART, math.ceil(size / MAX_PARTS / MiB) * MiB)


class PartBuffers:
    """The memory parts are read into: PARTS_IN_FLIGHT buffers, process-wide, each used for
    part after part. A new 8 MiB buffer per part is 2,048 pages the kernel must find and
    zero, and (on a VM whose kernel gives freed memory back to its host) a fault in the host
    for each one: uploading 512 MiB to Ceph RGW took 1.1-1.4 CPU-seconds and 262,000 page
    faults with a new buffer per part (and a copy of it on the way out), 0.4-0.5 and none
    with kept buffers. A buffer goes back for reuse only after its part's upload
    succeeded (the server answered, so no socket still sends from it); after a failure it
    is dropped."""

    def __init__(self, count: int = PARTS_IN_FLIGHT, keep_idle: float = KEEP_IDLE) -> None:
        self._slots = asyncio.Semaphore(count)
        self._kept: list[bytearray] = []
        self._keep_idle = keep_idle
        self._lending = 0
        self._release: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def lend(self, size: int) -> AsyncIterator[bytearray]:
        """A buffer of at least `size` bytes, once one of the slots is free."""
        async with self._slots:
            buffer = self._take(size)
            try:
                yield buffer
            except BaseException:
                self._give_back(None)
                raise
            self._give_back(buffer)

    def kept(self) -> int:
        """Buffers held for reuse now."""
        return len(self._kept)

    def _take(self, size: int) -> bytearray:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        self._lending += 1
        while self._kept:
            buffer = self._kept.pop()
            if len(buffer) >= size:
                return buffer
        return bytearray(size)

    def _give_back(self, buffer: bytearray | None) -> None:
        self._lending -= 1
        if buffer is not None:
            self._kept.append(buffer)
        if self._lending == 0 and self._kept:
            loop = asyncio.get_running_loop()
            self._release = loop.call_later(self._keep_idle, self._kept.clear)


class BucketUpload:
    """Copies one growing temp file to one key; see the module docstring."""

    def __init__(
        self,
        bucket: Bucket,
        key: str,
        size: int | None,
        temp: Path,
        on_stored: Callable[[int], None],
        buffers: PartBuffers,
        final: Path | None = None,
        on_unsent: Callable[[], None] | None = None,
    ) -> None:
        self._bucket = bucket
        self._on_unsent = on_unsent  # told when `complete` did not store the object
        self._buffers = buffers
        self._key = key
        self._temp = temp
        self._renamed = final  # where the temp file goes once verified
        self._on_stored = on_stored
        self._part = part_size(size)
        self._written = 0
        self._sent = 0
        self._final = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._upload_id: str | None = None
        self._etags: list[str] = []
        self._file: BinaryIO | None = None
        self._error: str | None = None
        # Whether the object failed to land for the bucket not answering (as opposed to
        # something wrong with this object): it may go up once the bucket is back.
        self.bucket_down = False

    def progress(self, written: int) -> None:
        self._written = written
        if self._task is None and self._error is None and written >= self._part:
            self._task = asyncio.create_task(self._send_parts())
        self._wake.set()

    async def complete(self) -> None:
        self._final = True
        self._wake.set()
        try:
            if self._task is None:
                await self._put_whole()
            else:
                await self._task
                if self._error is None and not self._given_up():
                    assert self._upload_id is not None
                    await self._bucket.complete_multipart(self._key, self._upload_id, self._etags)
                    self._upload_id = None
        except (BucketUnavailable, ClientError, BotoCoreError, OSError) as exc:
            self._failed(exc)
        finally:
            await self._close_file()
        if self._error is not None:
            log.warning("blob not stored in the bucket (%s): %s", self._key, self._error)
            await self.abort()
            if self._on_unsent is not None:
                self._on_unsent()
            return
        self._on_stored(self._written)

    async def abort(self) -> None:
        try:
            await self._abort()
        finally:  # cancelled too (a stop): the file is closed, not left to the collector
            await self._close_file()

    async def _abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None and not self._bucket.up:
            self._bucket.abort_later(self._key, upload_id)
        elif upload_id is not None:
            try:
                await self._bucket.abort_multipart(self._key, upload_id)
            except (BucketUnavailable, asyncio.CancelledError) as exc:
                self._bucket.abort_later(self._key, upload_id)  # or the next start's sweep
                if isinstance(exc, asyncio.CancelledError):
                    raise
            except (ClientError, BotoCoreError) as exc:
                # Left for `mirror gc` and later starts, which abort what is abandoned.
                log.warning("cannot abort the upload of %s: %s", self._key, _describe(exc))

    async def _put_whole(self) -> None:
        async with self._buffers.lend(self._written) as buffer:
            if self._given_up():
                return
            data = await self._read(buffer, 0, self._written)
            await self._bucket.put(self._key, data, "application/octet-stream")

    async def _send_parts(self) -> None:
        """Upload each full part as the file reaches it, and the rest once it is final."""
        try:
            if self._given_up():
                return
            self._upload_id = await self._bucket.create_multipart(self._key)
            while True:
                ready = self._written - self._sent
                if ready >= self._part or (self._final and ready > 0):
                    length = min(ready, self._part)
                    async with self._buffers.lend(self._part) as buffer:
                        if self._given_up():  # once a buffer is free: that may take long
                            return
                        data = await self._read(buffer, self._sent, length)
                        number = len(self._etags) + 1
                        etag = await self._bucket.upload_part(
                            self._key, self._upload_id, number, data
                        )
                    self._etags.append(etag)
                    self._sent += length
                    continue
                if self._final:
                    return
                self._wake.clear()
                await self._wake.wait()
        except (BucketUnavailable, ClientError, BotoCoreError, OSError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self._error = _describe(exc)
        self.bucket_down = self.bucket_down or isinstance(exc, BucketUnavailable)

    def _given_up(self) -> bool:
        """Nothing more is sent to a bucket known to be down: each part would wait out its
        deadline (holding a part buffer meanwhile) only to fail too."""
        if self._bucket.up:
            return False
        self._error = "the bucket is down"
        self.bucket_down = True
        return True

    async def _read(self, buffer: bytearray, offset: int, length: int) -> PartBody:
        """`length` bytes of the file from `offset`, read into `buffer` and sent from it."""
        if self._file is None:
            self._file = await open_off_loop(self._open)
        view = memoryview(buffer)[:length]
        await asyncio.to_thread(_read_into, self._file.fileno(), view, offset)
        return PartBody(view)

    def _open(self) -> BinaryIO:
        """The temp file, or the blob's file once it was renamed (blocking)."""
        try:
            return open(self._temp, "rb")  # closed in `_close_file`
        except FileNotFoundError:
            if self._renamed is None:
                raise
        return open(self._renamed, "rb")

    async def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await close_off_loop(file)


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset` (blocking); a file that ends first is an error."""
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"the temp file ended {len(view)} bytes early")
        view, offset = view[got:], offset + got


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "error"))
    return str(exc) or type(exc).__name__
