"""A blob's bytes as another server sends them: where they start, the whole size, the chunks.

The upstream client and the replicas' peer client hand over a `BlobBody`, so what a
response's status and `Content-Range` say about the bytes is read here and nowhere above.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp

# What reading a body raises when the transfer breaks (cut, reset, stalled past the read
# timeout): callers catch these, as they catch DOWN_ERRORS for Redis.
BODY_ERRORS = (aiohttp.ClientError, TimeoutError)


class BlobBody:
    """The bytes of a blob from `offset`; `total` is the whole blob's size when known and
    `length` this body's own. Release it, or use it as an async context manager."""

    __slots__ = ("_response", "length", "offset", "total")

    def __init__(self, response: aiohttp.ClientResponse, offset: int, total: int | None) -> None:
        self._response = response
        self.offset = offset
        self.total = total
        self.length = response.content_length

    @classmethod
    def of(cls, response: aiohttp.ClientResponse) -> BlobBody | None:
        """The body of a 2xx response: a 206 from its `Content-Range` (None when that does
        not say where the bytes start), anything else the whole blob."""
        if response.status != 206:
            return cls(response, 0, response.content_length)
        span = parse_content_range(response.headers.get("Content-Range", ""))
        if span is None:
            return None
        return cls(response, *span)

    def chunks(self, size: int | None = None) -> AsyncIterator[bytes]:
        """The bytes as they arrive, at most `size` at a time (None: whatever is there).
        The socket's own iterator, unwrapped: a broken transfer raises BODY_ERRORS."""
        content = self._response.content
        return content.iter_any() if size is None else content.iter_chunked(size)

    def release(self) -> None:
        """Give the connection back (or drop it, mid-body)."""
        self._response.release()

    async def __aenter__(self) -> BlobBody:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._response.__aexit__(exc_type, exc, tb)


def parse_content_range(value: str) -> tuple[int, int | None] | None:
    """(first byte, whole size) of `bytes first-last/size`, the size None when not given
    (`*`); None when the first byte is not there."""
    unit, _, rest = value.partition(" ")
    first = rest.partition("-")[0]
    if unit != "bytes" or not first.isdigit():
        return None
    size = rest.rpartition("/")[2]
    return int(first), int(size) if size.isdigit() else None
