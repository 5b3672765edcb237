"""A blob's bytes as another server sends them: where they start, the whole size, the chunks.

The upstream client and the replicas' peer client hand over a `BlobBody`, so what a
response's status and `Content-Range` say about the bytes is read here and nowhere above.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from mirror.net.pieces import received_pieces
from mirror.oci.errors import UpstreamUnavailable

# What reading a body raises when the transfer breaks (cut, reset, stalled past the read
# timeout): callers catch these, as they catch DOWN_ERRORS for Redis.
BODY_ERRORS = (aiohttp.ClientError, TimeoutError)
# The slowest a body may come, over each window of PACE_WINDOW seconds: far below any
# registry's link (1 KiB/s), far above a trickle meant to hold a download, and every client
# waiting on it, for hours while each read comes within the read timeout.
PACE_WINDOW = 60.0
PACE_MIN = 64 * 1024
# A number in a header: ASCII digits (str.isdigit takes "²" too, which int() refuses), few
# enough that int() takes them whatever its digit limit, and any sum of them a float.
_NUMBER = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """The most bytes a blob may have; `refused()` counts a refusal and gives its error."""

    most: int
    refused: Callable[[], Exception]


class TooSlow(UpstreamUnavailable):
    """The body came slower than PACE_MIN bytes per PACE_WINDOW: given up, not resumed
    (a resume from a sender that trickles would trickle again)."""


class TooLong(UpstreamUnavailable):
    """The body went on past the length its headers gave: nothing past it is handed out."""


class Pace:
    """The bytes that came over the current PACE_WINDOW. A download keeps one across the
    bodies of its resumes: a sender that cuts each connection after a few bytes must not
    start a fresh window with each."""

    __slots__ = ("_counted", "_since")

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._counted = 0

    def count(self, received: int, sender: str | None) -> None:
        """Add bytes that came from `sender`; TooSlow when a window ends with fewer than
        PACE_MIN."""
        self._counted += received
        now = time.monotonic()
        if now - self._since < PACE_WINDOW:
            return
        if self._counted < PACE_MIN:
            raise TooSlow(
                f"{sender} sent {self._counted} bytes in {now - self._since:.0f}s: "
                "too slow to wait for"
            )
        self._since, self._counted = now, 0


class BlobBody:
    """The bytes of a blob from `offset`; `total` is the whole blob's size when known and
    `length` this body's own. Release it, or use it as an async context manager."""

    __slots__ = ("_limit", "_response", "length", "offset", "total")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        offset: int,
        total: int | None,
        limit: SizeLimit | None = None,
    ) -> None:
        self._response = response
        self.offset = offset
        self.total = total
        self.length = response.content_length
        self._limit = limit

    @classmethod
    def of(
        cls,
        response: aiohttp.ClientResponse,
        limit: SizeLimit | None = None,
        asked: int | None = None,
    ) -> BlobBody | None:
        """The body of a 2xx response to a request for the blob from byte `asked` (None: no
        Range was sent). A 206 must answer a Range, from the byte asked, its Content-Range
        and Content-Length agreeing (None otherwise); anything else is the whole blob. Over
        `limit` by its headers, it is refused before any byte is read (the response
        released)."""
        if response.status != 206:
            body = cls(response, 0, response.content_length, limit)
        else:
            span = parse_content_range(response.headers.get("Content-Range", ""))
            if asked is None or span is None or span[0] != asked:
                return None
            body = cls(response, span[0], span[2], limit)
            if not body._within(span[1]):
                return None
        if limit is not None and body.declared() > limit.most:
            response.release()
            raise limit.refused()
        return body

    def _within(self, last: int | None) -> bool:
        """Take a 206's length from its Content-Range (`last`, its last byte, if given):
        whether the range lies within the blob and its Content-Length (if sent) agrees."""
        if last is None:
            return self.total is None or self.offset <= self.total
        length = last + 1 - self.offset  # 0: asked from the blob's very end
        if length < 0 or (self.total is not None and last >= self.total):
            return False
        if self.length is not None and self.length != length:
            return False
        self.length = length
        return True

    def declared(self) -> int:
        """The blob's size as far as the headers say (0 when they say nothing)."""
        return max(self.total or 0, self.offset + (self.length or 0))

    def chunks(self, size: int | None = None, pace: Pace | None = None) -> AsyncIterator[bytes]:
        """The bytes as they arrive, at most `size` at a time (None: whatever is there),
        their pace counted in `pace` (a new one: this body's own). A broken transfer, or a
        body that ends before its length, raises BODY_ERRORS; bytes past its length raise
        TooLong and past the limit its error (never handed out, the connection dropped)."""
        content = self._response.content
        received = received_pieces(content) if size is None else content.iter_chunked(size)
        chunks: AsyncIterator[bytes] = _Paced(received, self._response, pace or Pace())
        if self.length is not None and self._response.content_length != self.length:
            # A length from Content-Range alone (a chunked 206): held to it here. One the
            # Content-Length gives, aiohttp's parser holds the body to already.
            chunks = _Measured(chunks, self.length, self._response)
        if self._limit is None:
            return chunks
        return _Bounded(chunks, self.offset, self._limit, self._response)

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


class _Paced:
    """An iterator of chunks that gives up, with TooSlow, once its `Pace` finds too few
    bytes in a window (looked at as chunks come: a body that stops is the read
    timeout's)."""

    __slots__ = ("_chunks", "_pace", "_response", "_sender")

    def __init__(
        self, chunks: AsyncIterator[bytes], response: aiohttp.ClientResponse, pace: Pace
    ) -> None:
        self._chunks = chunks
        self._response = response
        self._sender = response.url.host
        self._pace = pace

    def __aiter__(self) -> _Paced:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        try:
            self._pace.count(len(chunk), self._sender)
        except TooSlow:
            self._response.release()
            raise
        return chunk


class _Measured:
    """An iterator of chunks held to the body's length, when known: TooLong at the first
    byte past it (which never comes out), a payload error when it ends short of it."""

    __slots__ = ("_chunks", "_length", "_read", "_response")

    def __init__(
        self, chunks: AsyncIterator[bytes], length: int | None, response: aiohttp.ClientResponse
    ) -> None:
        self._chunks = chunks
        self._length = length
        self._response = response
        self._read = 0

    def __aiter__(self) -> _Measured:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            if self._length is not None and self._read < self._length:
                raise aiohttp.ClientPayloadError(
                    f"body ended at {self._read} of its {self._length} bytes"
                ) from None
            raise
        self._read += len(chunk)
        if self._length is not None and self._read > self._length:
            self._response.release()  # not one byte more from this sender
            raise TooLong(
                f"{self._response.url.host} sent more than the {self._length} bytes "
                "its headers gave"
            )
        return chunk


class _Bounded:
    """An iterator of chunks that stops, with the limit's error, at the first byte too many."""

    __slots__ = ("_chunks", "_limit", "_pos", "_response")

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        offset: int,
        limit: SizeLimit,
        response: aiohttp.ClientResponse,
    ) -> None:
        self._chunks = chunks
        self._pos = offset
        self._limit = limit
        self._response = response

    def __aiter__(self) -> _Bounded:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        self._pos += len(chunk)
        if self._pos > self._limit.most:
            self._response.release()  # not one byte more from this upstream
            raise self._limit.refused()
        return chunk


def parse_content_range(value: str) -> tuple[int, int | None, int | None] | None:
    """(first byte, last byte, whole size) of `bytes first-last/size`, the last byte or
    the size None when not given (`*`); None when the first byte is not there."""
    unit, _, rest = value.partition(" ")
    span, _, size = rest.partition("/")
    first, _, last = span.partition("-")
    start = header_number(first)
    if unit != "bytes" or start is None:
        return None
    return start, header_number(last), header_number(size)


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int, too_large: Callable[[], Exception]
) -> bytes:
    """A small answer's whole body; `too_large()` raised as soon as it is known to pass
    `limit` bytes, by its length or by what came (no more of it is read)."""
    if response.content_length is not None and response.content_length > limit:
        raise too_large()
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise too_large()
    return bytes(body)


def header_number(value: str) -> int | None:
    """The whole number a header value (or a part of one) is; None when it is none."""
    return int(value) if _NUMBER.fullmatch(value) else None
