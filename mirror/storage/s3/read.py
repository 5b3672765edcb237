"""A blob's bytes from one bucket GET relayed to a client as they come, nothing kept.

This carries a range (which cannot be verified, so it is never kept) and a whole object
the local tier cannot take now (full, refusing writes, or filling it already); a whole
object otherwise goes through the local tier (spool.py). An object is in the bucket only
once its digest matched (see upload.py): the bucket is trusted for what it relays here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError

from mirror.observe.metrics import Metrics
from mirror.storage.base import StoreReadError

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

BLOCK = 1024 * 1024


class BucketStream:
    """One GetObject's body as a `BlobStream`, relayed in blocks of about BLOCK bytes."""

    def __init__(
        self, response: GetObjectOutputTypeDef, metrics: Metrics, on_close: Callable[[], None]
    ) -> None:
        self.status = response["ResponseMetadata"]["HTTPStatusCode"]
        self.length = response["ContentLength"]
        self.content_range: str | None = response.get("ContentRange")
        self._body = response["Body"]
        self._metrics = metrics
        self._on_close = on_close
        self._chunks: AsyncGenerator[bytes, None] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        self._chunks = self._blocks()
        return self._chunks

    async def close(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()
        self._body.close()
        self._on_close()

    async def _blocks(self) -> AsyncGenerator[bytes, None]:
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
