"""An upload's part as the request body: its buffer sent as it is, in one write.

Given bytes, botocore wraps them in a BytesIO, and aiohttp's payload for a BytesIO asks for
its buffer, which copies the whole part into new memory before it is sent 64 KiB at a
time. Given a bytearray, aiohttp warns that a large body might hold up the loop. This
body is a payload aiohttp takes as it is (a view of the part's buffer, handed to the
transport in one write, which queues the view rather than copying it), and a file-like
object as botocore wants one: `read`, `seek`, `tell` and a length.
"""

from __future__ import annotations

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

CONTENT_TYPE = "application/octet-stream"


class PartBody(Payload):
    """The bytes of `view`, never copied; reusable (botocore sends it again on a retry)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__(view, content_type=CONTENT_TYPE)
        self._view = view
        self._size = view.nbytes
        self._position = 0

    def __len__(self) -> int:
        return self._view.nbytes

    async def write(self, writer: AbstractStreamWriter) -> None:
        await writer.write(self._view)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        await writer.write(self._view if content_length is None else self._view[:content_length])

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._view.tobytes().decode(encoding, errors)

    # --- what botocore asks of a file-like body (its length, a rewind before a retry) ----
    def read(self, size: int = -1) -> bytes:
        end = self._view.nbytes if size < 0 else min(self._view.nbytes, self._position + size)
        data = self._view[self._position : end].tobytes()
        self._position = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._view.nbytes}[whence]
        self._position = max(0, min(self._view.nbytes, base + offset))
        return self._position

    def tell(self) -> int:
        return self._position

    def __repr__(self) -> str:
        return f"PartBody({self._view.nbytes} bytes)"
