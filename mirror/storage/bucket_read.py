"""A blob's bytes from one bucket GET, streamed to a client; the local tier filled on the way.

When the whole object is read, its hash is checked as it goes and the last block is held
back until it matches (as for a download from upstream): a client never receives a
complete-looking wrong body. The same bytes go to a temp file of the local tier, renamed
under the digest only on a match. A ranged read is relayed as it comes, nothing kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError

from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.storage.base import StoreReadError
from mirror.storage.filesystem import Storage

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024


class LocalFill:
    """A temp file in the local tier taking a blob's bytes; kept only when they match."""

    def __init__(self, storage: Storage, digest: Digest) -> None:
        self._storage = storage
        self._digest = digest
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

    async def keep(self) -> None:
        fd, temp, self._fd = self._fd, self._temp, None
        assert fd is not None and temp is not None
        try:
            await asyncio.to_thread(
                self._storage.commit, fd, temp, self._storage.blob_path(self._digest)
            )
        except OSError as exc:
            self._storage.mark_unwritable(exc)
            await asyncio.to_thread(self._storage.discard, None, temp)

    async def drop(self) -> None:
        if self._fd is not None or self._temp is not None:
            fd, self._fd = self._fd, None
            await asyncio.to_thread(self._storage.discard, fd, self._temp)


class BucketStream:
    """One GetObject's body as a `BlobStream` (see the module docstring)."""

    def __init__(
        self,
        response: GetObjectOutputTypeDef,
        digest: Digest,
        metrics: Metrics,
        fill: LocalFill | None,
        on_close: Callable[[], None],
    ) -> None:
        self.status = response["ResponseMetadata"]["HTTPStatusCode"]
        self.length = response["ContentLength"]
        self.content_range: str | None = response.get("ContentRange")
        self._body = response["Body"]
        self._digest = digest
        self._metrics = metrics
        self._fill = fill
        self._on_close = on_close
        self._whole = self.status == 200
        self._chunks: AsyncIterator[bytes] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        self._chunks = self._verified() if self._whole else self._blocks()
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
        buffer = bytearray()
        try:
            while chunk := await self._body.read(BLOCK):
                self._metrics.s3_bytes.labels("received").inc(len(chunk))
                buffer += chunk
                if len(buffer) >= BLOCK:
                    yield bytes(buffer)
                    buffer.clear()
        except (aiohttp.ClientError, BotoCoreError, TimeoutError, OSError) as exc:
            raise StoreReadError(f"bucket read broke: {type(exc).__name__}") from None
        if buffer:
            yield bytes(buffer)

    async def _verified(self) -> AsyncIterator[bytes]:
        """The whole body, hashed (and written to the local tier) one block behind what is
        sent, the last block held until the hash matches."""
        hasher = self._digest.hasher()
        pending: asyncio.Future[None] | None = None
        held: bytes | None = None
        try:
            async for block in self._blocks():
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(self._absorb(hasher, block))
                if held is not None:
                    yield held
                held = block
            if pending is not None:
                await pending
                pending = None
        finally:
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if hasher.hexdigest() != self._digest.hex:
            self._metrics.digest_mismatches.labels("blob").inc()
            raise StoreReadError(f"bucket object for {self._digest} does not match it")
        if self._fill is not None:
            fill, self._fill = self._fill, None
            await fill.keep()
        if held is not None:
            yield held

    async def _absorb(self, hasher: hashlib._Hash, block: bytes) -> None:
        """Hash the block and write it to the local tier, side by side in worker threads."""
        work = [asyncio.to_thread(hasher.update, block)]
        if self._fill is not None:
            work.append(asyncio.to_thread(self._fill.write, block))
        results = await asyncio.gather(*work, return_exceptions=True)
        if len(results) > 1 and isinstance(results[1], OSError) and self._fill is not None:
            fill, self._fill = self._fill, None  # a full disk: go on without the local copy
            await fill.drop()
