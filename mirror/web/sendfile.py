"""Sending a span of a file as a response body: sendfile, or copied where it cannot be."""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO

from aiohttp import web

from mirror.net.tls import is_tls

# Bytes read from the file per write when sendfile cannot be used (TLS, chunked bodies).
READ_CHUNK = 1024 * 1024


async def send_file(
    request: web.Request, resp: web.StreamResponse, file: BinaryIO, offset: int, length: int
) -> None:
    """`length` bytes of `file` from `offset` after `resp`'s headers (prepared already):
    straight to the socket by sendfile, with no copy through Python, where it can be."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the receiver went away")
    # A response without a length goes out chunked, which sendfile would bypass; over TLS
    # large chunks through the writer are faster (see is_tls).
    if resp.content_length is not None and not is_tls(transport):
        try:
            # The headers went out at prepare(): the body may bypass aiohttp's writer, as
            # FileResponse does.
            await asyncio.get_running_loop().sendfile(transport, file, offset, length)
            return
        except NotImplementedError:  # an event loop without sendfile
            pass
    for pos in range(offset, offset + length, READ_CHUNK):
        size = min(READ_CHUNK, offset + length - pos)
        await resp.write(await asyncio.to_thread(os.pread, file.fileno(), size, pos))
