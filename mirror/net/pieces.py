"""A response body read in the pieces aiohttp received it in.

`StreamReader.iter_any()` and `read(n)` join every piece buffered meanwhile into one new
bytes: a copy of each byte of a layer on the event loop, made whenever the loop was busy
(serving the clients that follow a download). `readchunk()` hands the pieces out as they
are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp


async def received_pieces(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's bytes, piece by piece, until its end; HTTP chunk boundaries end nothing."""
    while True:
        data, boundary = await content.readchunk()
        if data:
            yield data
        elif not boundary:  # (b"", False): the end
            return
