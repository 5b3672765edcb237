"""A blob's bytes from one bucket GET, streamed to a client; the local tier filled on the way.

An object is in the bucket only once its digest matched (see upload.py), so its bytes go
to the client as they come, at the bucket's pace. When the whole object is read, they are
also written to a temp file of the local tier, which is hashed after the client has it all
and renamed under the digest only on a match: a local file is verified as ever. (A hash in
the client's path would double the time of a warm GET on a small machine.) A mismatch
means the object was changed behind the mirror's back: it is deleted from the bucket too.
A ranged read is relayed as it comes, nothing kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError

from mirror.observe.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.storage.base import StoreReadError
from mirror.storage.filesystem import Storage

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024


class LocalFill:
    """A temp file in the local tier taking a blob's bytes; kept only when they match."""

    def __init__(
        self,
        storage: Storage,
        digest: Digest,
        on_mismatch: Callable[[], Awaitable[None]],
        on_done: Callable[[], None],
    ) -> None:
        self._storage = storage
        self._digest = digest
        self._on_mismatch = on_mismatch
        self._on_done = on_done  # kept or dropped: another read may fill the tier now
        self._fd: int | None = None
        self._temp: Path | None = None

    async def begin(self, size: int) -> bool:
        try:
            self._fd, self._temp = await asyncio.to_thread(self._storage.new_temp, size)
        except OSError as exc:
            self._storage.mark_unwritable(exc)
            return False
        return True

    def write(self, data: bytes) -> None:
        """(blocking)"""
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def keep_if_matching(self, metrics: Metrics) -> None:
        """Hash the copy; on a match fsync and rename it under its digest, else drop it
        and the bucket's object (`on_mismatch`)."""
        try:
            await self._keep_if_matching(metrics)
        finally:
            self._on_done()

    async def _keep_if_matching(self, metrics: Metrics) -> None:
        assert self._fd is not None
        if not await asyncio.to_thread(_fd_matches, self._fd, self._digest):
            metrics.digest_mismatches.labels("blob").inc()
            log.error("bucket object for %s does not match it: deleted", self._digest)
            await self.drop()
            await self._on_mismatch()
            return
        fd, temp, self._fd, self._temp = self._fd, self._temp, None, None
        assert temp is not None
        try:
            await asyncio.to_thread(
                self._storage.commit, fd, temp, self._storage.blob_path(self._digest)
            )
        except OSError as exc:
            self._storage.mark_unwritable(exc)
            await asyncio.to_thread(self._storage.discard, None, temp)

    async def drop(self) -> None:
        if self._fd is not None or self._temp is not None:
            fd, temp, self._fd, self._temp = self._fd, self._temp, None, None
            try:
                await asyncio.to_thread(self._storage.discard, fd, temp)
            finally:
                self._on_done()


class BucketStream:
    """One GetObject's body as a `BlobStream` (see the module docstring)."""

    def __init__(
        self,
        response: GetObjectOutputTypeDef,
        digest: Digest,
        metrics: Metrics,
        fill: LocalFill | None,
        on_close: Callable[[], None],
        in_background: Callable[[Coroutine[None, None, None]], None],
    ) -> None:
        self.status = response["ResponseMetadata"]["HTTPStatusCode"]
        self.length = response["ContentLength"]
        self.content_range: str | None = response.get("ContentRange")
        self._body = response["Body"]
        self._digest = digest
        self._metrics = metrics
        self._fill = fill
        self._on_close = on_close
        self._in_background = in_background
        self._whole = self.status == 200
        self._chunks: AsyncIterator[bytes] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        self._chunks = self._teed() if self._whole else self._blocks()
        return self._chunks

    async def close(self) -> None:
        if self._chunks is not None and hasattr(self._chunks, "aclose"):
            await self._chunks.aclose()
        self._body.close()
        if self._fill is not None:
            await self._fill.drop()
        self._on_close()

    async def _blocks(self) -> AsyncIterator[bytes]:
        """The body in blocks of about BLOCK bytes."""
        parts: list[bytes] = []
        gathered = 0
        received = self._metrics.s3_bytes.labels("received")
        try:
            while chunk := await self._body.read(BLOCK - gathered):
                received.inc(len(chunk))
                parts.append(chunk)
                gathered += len(chunk)
                if gathered >= BLOCK:
                    yield b"".join(parts)  # one copy, however many chunks
                    parts, gathered = [], 0
        except (aiohttp.ClientError, BotoCoreError, TimeoutError, OSError) as exc:
            raise StoreReadError(f"bucket read broke: {type(exc).__name__}") from None
        if parts:
            yield b"".join(parts)

    async def _teed(self) -> AsyncIterator[bytes]:
        """The whole body, each block written to the local tier's temp file while the next
        is read; the copy is hashed and kept (or dropped) after the client has it all."""
        pending: asyncio.Future[None] | None = None
        try:
            async for block in self._blocks():
                if pending is not None:
                    await pending  # one write in flight: memory stays at a few blocks
                if self._fill is not None:
                    pending = asyncio.ensure_future(self._write(block))
                yield block
            if pending is not None:
                await pending
                pending = None
        finally:
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if self._fill is not None:
            fill, self._fill = self._fill, None
            self._in_background(fill.keep_if_matching(self._metrics))

    async def _write(self, block: bytes) -> None:
        fill = self._fill
        if fill is None:
            return
        try:
            await asyncio.to_thread(fill.write, block)
        except OSError:
            self._fill = None  # a full disk: go on without the local copy
            await fill.drop()


def _fd_matches(fd: int, digest: Digest) -> bool:
    """Do the file's bytes hash to `digest`? (blocking)"""
    hasher = digest.hasher()
    offset = 0
    while chunk := os.pread(fd, BLOCK * 4, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest() == digest.hex
