"""Sending a span of a file as a response body: sendfile, or copied where it cannot be.

A client that stops reading is cut after the connection's send timeout either way: by
sendfile's own wait (net/sendfile.py), or, for the copy, by the connection guard, which
sees the bytes wait in the transport (connections.py). Until then a copy holds less than
a MiB for it (see `_copy`), and nothing once it has gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import BinaryIO

from aiohttp import web

from mirror.net import sendfile
from mirror.web.connections import cut_stalled, send_timeout

log = logging.getLogger(__name__)

# Where sendfile cannot be used (TLS, chunked bodies): the bytes read and written at a
# time, and the transport's high-water mark meanwhile (see `_copy`).
COPY_PIECE = 128 * 1024
COPY_HIGH_WATER = 64 * 1024


async def send_file(
    request: web.Request,
    resp: web.StreamResponse,
    file: BinaryIO,
    span: tuple[int, int],
    on_sent: sendfile.OnSent,
) -> None:
    """The `span` (offset, length) of `file` after `resp`'s headers (prepared already):
    straight to the socket by sendfile, with no copy through Python, where it can be.
    `on_sent` is told the bytes as they go out, so a cut transfer counts what it sent."""
    offset, length = span
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the receiver went away")
    # A response without a length goes out chunked, which sendfile would bypass; over TLS
    # the bytes must pass through the transport to be encrypted (mirror/net/tls.py is_tls).
    if resp.content_length is not None:
        try:
            # A StreamResponse's head went out at prepare(): the body may bypass aiohttp's
            # writer, as its FileResponse does.
            timeout = send_timeout(transport)
            await sendfile.sendfile(transport, file.fileno(), offset, length, timeout, on_sent)
            return
        except NotImplementedError:  # TLS, or a file or socket sendfile refuses
            pass
        except sendfile.FileEnded as exc:
            # The file shrank under us: a cut connection, never a short body that looks whole.
            log.warning("%s: connection cut", exc)
            transport.abort()
            raise ConnectionResetError("the file ended before the body") from None
        except sendfile.SendTimeout:
            cut_stalled(transport)  # counted and logged by the connection's guard
            raise
    await _copy(transport, resp, file, span, on_sent)


async def _copy(
    transport: asyncio.Transport,
    resp: web.StreamResponse,
    file: BinaryIO,
    span: tuple[int, int],
    on_sent: sendfile.OnSent,
) -> None:
    """The span read piece by piece, each written once the last has (nearly) left.

    aiohttp's write waits while the transport is over its high-water mark. A TLS transport
    counts only the bytes it has encrypted and not yet passed to the socket's transport
    below it, and that one takes all of them while under its own mark: so a client that
    stops reading leaves about a piece in each, and one in hand (at the default marks and
    1 MiB pieces, 3-4 MB a client).
    """
    offset, length = span
    transport.set_write_buffer_limits(high=COPY_HIGH_WATER)
    try:
        for pos in range(offset, offset + length, COPY_PIECE):
            size = min(COPY_PIECE, offset + length - pos)
            chunk = await _read(file.fileno(), size, pos)
            await resp.write(chunk)
            on_sent(len(chunk))
    except (ConnectionError, asyncio.CancelledError) as exc:
        # The client left. The traceback holds the frames down to aiohttp's drain, which
        # hold the piece, and that drain's waiter and exception hold each other: a cycle
        # left to a full garbage collection, the piece in it. Cut, it all goes at once.
        exc.__traceback__ = None
        raise


async def _read(fd: int, size: int, pos: int) -> bytearray:
    """`size` bytes of the file at `pos` (fewer past its end): on the event loop as far as
    the page cache holds them, the rest in a thread.

    RWF_NOWAIT stops a read short where it would wait for the disk, so the loop never
    waits for one. A cached blob is read without a hop to a thread and back per piece,
    which costs more than the copy: a TLS copy in 128 KiB pieces, each read in a thread,
    took nearly twice the CPU of one in 1 MiB pieces."""
    piece = bytearray(size)
    try:
        got = os.preadv(fd, [piece], pos, os.RWF_NOWAIT)
    except OSError:  # nothing of it cached (EAGAIN), or no RWF_NOWAIT here: all in the thread
        got = 0
    if got < size:
        del piece[got:]
        piece += await asyncio.to_thread(os.pread, fd, size - got, pos + got)
    return piece
