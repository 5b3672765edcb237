"""Where a spooled bucket object's bytes come from (spool.py `SpoolSource`).

`SplicedSource`: a presigned GET over plain HTTP, its body spliced from the socket into
the file inside the kernel (net/splice.py), in a thread; the loop hears how far it got.
`PiecesSource`: the GetObject's body as aiohttp received it, written in large batches from
a thread (TLS, a proxy, or an answer the spliced GET left to the S3 client).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError
from prometheus_client import Counter

from mirror.net.pieces import received_pieces
from mirror.net.splice import BodyBroken, SplicedGet
from mirror.storage.base import StoreReadError
from mirror.storage.s3.spool import SpoolFile
from mirror.util.settle import in_thread, settled

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody

# Bytes gathered from the socket per write in the thread: a few hundred thread hops for a
# large blob rather than thousands.
BATCH = 4 * 1024 * 1024
READ_ERRORS = (aiohttp.ClientError, BotoCoreError, TimeoutError, OSError)


class PiecesSource:
    """The GetObject's body as aiohttp received it: batches written in a thread while the
    next is read (one write in flight: memory stays at about two batches)."""

    def __init__(self, body: StreamingBody) -> None:
        self._body = body

    async def land(self, file: SpoolFile, landed: Callable[[int], None], counted: Counter) -> None:
        pending: asyncio.Future[int] | None = None
        parts: list[bytes] = []
        gathered = written = 0
        try:
            async for chunk in self._chunks():
                counted.inc(len(chunk))
                parts.append(chunk)
                gathered += len(chunk)
                if gathered >= BATCH:
                    if pending is not None:
                        written += await pending
                        landed(written)
                    write = functools.partial(file.write, parts, written)
                    pending = asyncio.ensure_future(in_thread(write))
                    parts, gathered = [], 0
            if pending is not None:
                written += await pending
                landed(written)
            pending = None
            if parts:
                written += await in_thread(functools.partial(file.write, parts, written))
                landed(written)
        finally:
            if pending is not None:  # cancelled or broken: let the write settle first
                await settled(pending)

    async def _chunks(self) -> AsyncIterator[bytes]:
        # The pieces as received: the body's read(n) would join them into new bytes.
        try:
            async for chunk in received_pieces(self._body.raw_stream.content):
                yield chunk
        except READ_ERRORS as exc:
            raise StoreReadError(f"bucket read broke: {type(exc).__name__}") from None

    def close(self) -> None:
        self._body.close()


class SplicedSource:
    """A presigned GET's body spliced from its socket into the file (net/splice.py), in a
    thread; the loop hears how far it got."""

    def __init__(self, get: SplicedGet, threads: Executor, done: Callable[[], None]) -> None:
        self._get = get
        self._threads = threads  # one held for the whole transfer: not the loop's default
        self._done: Callable[[], None] | None = done

    async def land(self, file: SpoolFile, landed: Callable[[int], None], counted: Counter) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        reported = 0

        def report(done: int) -> None:
            nonlocal reported
            counted.inc(done - reported)
            reported = done
            landed(done)

        def progress(done: int) -> None:  # in the thread
            loop.call_soon_threadsafe(report, done)

        work = loop.run_in_executor(self._threads, self._get.splice_into, file.fd, progress, stop)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the thread stops within a poll slice; the file is its until then
            await asyncio.gather(work, return_exceptions=True)
            raise
        except BodyBroken as exc:
            raise StoreReadError(f"bucket read broke: {exc}") from None
        # The thread's last report was queued before its result: `landed` has it already.

    def close(self) -> None:
        self._get.close()
        done, self._done = self._done, None
        if done is not None:
            done()
