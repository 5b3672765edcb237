"""Whether a client is reading what it is sent: the bytes of its TCP connection it has
acknowledged, looked at now and then.

A socket that takes no more bytes says little: Linux grows a socket's send buffer to
megabytes, and the socket turns writable only once half of what it holds is acknowledged,
so a client reading 100 KB/s can leave it unwritable for many seconds (a transport's own
buffer drains in the same steps). The kernel's count of bytes acknowledged
(`tcpi_bytes_acked`, Linux 4.1 on) moves each time the client's reading lets another
segment in, and not at all while it reads nothing: the answer to a zero-window probe
acknowledges no new byte. It counts what reached the client whatever sent it (sendfile, a
transport's writes, TLS records), so one measure serves every way a body goes out.
"""

from __future__ import annotations

import asyncio
import socket
import sys

# struct tcp_info (linux/tcp.h) only ever grows at its end: tcpi_bytes_acked, a __u64,
# has sat at byte 120 since Linux 4.1.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_ACKED = slice(120, 128)


def acknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of the transport's TCP connection its peer has acknowledged so far; None
    where the kernel does not say (no socket, not Linux, a kernel before 4.1)."""
    sock = transport.get_extra_info("socket")
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _ACKED.stop)
    except OSError:  # closed meanwhile, or not a TCP socket
        return None
    if len(info) < _ACKED.stop:
        return None
    return int.from_bytes(info[_ACKED], sys.byteorder)


class Stall:
    """How long a client's count of acknowledged bytes has stood still, from one look to
    the next: a stall counts from the first look that saw the count, so it is seen at most
    one interval between looks late."""

    __slots__ = ("limit", "_acked", "_since")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._acked: int | None = None
        self._since = 0.0

    def overdue(self, transport: asyncio.BaseTransport, now: float) -> bool:
        """True once the count has not moved for `limit` seconds, as of `now` (the loop's
        clock). A count that cannot be read never makes a client overdue."""
        acked = acknowledged(transport)
        if acked is None:
            return False
        if acked != self._acked:
            self._acked, self._since = acked, now
            return False
        return now - self._since >= self.limit
