"""Sending a span of a file as a response body: sendfile, or copied where it cannot be.

A client that stops reading is cut after the connection's send timeout either way: by
sendfile's own wait (net/sendfile.py), or, for the copy, by the connection guard, which
sees the bytes wait in the transport (connections.py).
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

# Bytes read from the file per write when sendfile cannot be used (TLS, chunked bodies).
READ_CHUNK = 1024 * 1024


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
    for pos in range(offset, offset + length, READ_CHUNK):
        size = min(READ_CHUNK, offset + length - pos)
        chunk = await asyncio.to_thread(os.pread, file.fileno(), size, pos)
        await resp.write(chunk)
        on_sent(len(chunk))
