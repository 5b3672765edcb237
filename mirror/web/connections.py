"""Connection limits below HTTP: a cap on open connections, and a deadline for a request head.

Each accepted connection's protocol (aiohttp's request handler) is wrapped in a
`GuardedConnection`, which watches the bytes go by without parsing them:

- a request head (up to its blank line) must be complete within `header_timeout` of the
  connection opening, or of its own first byte on a kept-alive connection, else the
  connection is dropped: a slowloris client, which sends a header byte now and then, holds
  a connection for that long at most. (The mirror serves GET and HEAD only: bytes after a
  head are the next head.) A kept-alive connection that sends nothing is aiohttp's to
  close, after `keepalive_timeout`;
- at most `max_connections` are open. At the cap, the connection that has waited longest
  for an unfinished head is dropped to make room (a real client sends its head at once, so
  those are the slow ones); only when there is none is the newcomer refused with a 503.
  So under a flood of slow connections `/healthz` and real clients still get in.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from mirror.observe.guard_metrics import GuardMetrics

HEAD_END = b"\r\n\r\n"
# Sent to a connection refused at the cap; small enough for any socket buffer.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


class ConnectionGuard:
    """The open connections, and those waiting for an unfinished head (longest first)."""

    def __init__(self, max_connections: int, header_timeout: float, metrics: GuardMetrics) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.metrics = metrics
        self._open: set[GuardedConnection] = set()
        # The first entry is the connection waiting longest. An OrderedDict, not a dict:
        # taking a dict's first entry again and again walks the ones deleted before it.
        self._headless: OrderedDict[GuardedConnection, None] = OrderedDict()

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose connections this guard limits."""
        return lambda: GuardedConnection(self, factory())

    def admit(self, conn: GuardedConnection) -> bool:
        """Count `conn` in, dropping a headless one to make room; False: refused."""
        if len(self._open) >= self.max_connections:
            if not self._headless:
                self.metrics.connections_refused.inc()
                return False
            oldest, _ = self._headless.popitem(last=False)
            self.metrics.connections_dropped.labels("evicted").inc()
            oldest.drop()
        self._open.add(conn)
        self.metrics.connections_open.set(len(self._open))
        return True

    def waiting(self, conn: GuardedConnection) -> None:
        """`conn` is waiting for a request head: a candidate to drop, after older ones."""
        self._headless[conn] = None

    def headed(self, conn: GuardedConnection) -> None:
        """`conn` has sent a complete request head: no longer a candidate to drop."""
        self._headless.pop(conn, None)

    def closed(self, conn: GuardedConnection) -> None:
        self._open.discard(conn)
        self._headless.pop(conn, None)
        self.metrics.connections_open.set(len(self._open))


class GuardedConnection(asyncio.Protocol):
    """Passes everything to the wrapped protocol; drops the connection when the guard says."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a blank line split across reads
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport (uvloop's are not).
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(self):
            transport.write(REFUSAL)
            transport.close()
            return
        self._admitted = True
        self._await_head()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        seen = self._tail + data
        end = seen.rfind(HEAD_END)
        if end >= 0:
            self._headed()
            seen = seen[end + len(HEAD_END) :]
        if seen:  # the start of a (further) head
            self._await_head()
            self._tail = seen[-(len(HEAD_END) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._guard.closed(self)
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def drop(self) -> None:
        """Close at once, nothing sent: the client has not asked for anything yet."""
        self._cancel_deadline()
        self._guard.closed(self)
        if self._transport is not None:
            self._transport.abort()

    def _too_slow(self) -> None:
        self._deadline = None
        self._guard.metrics.connections_dropped.labels("header_timeout").inc()
        self.drop()

    def _await_head(self) -> None:
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._guard.header_timeout, self._too_slow)
            self._guard.waiting(self)

    def _headed(self) -> None:
        self._cancel_deadline()
        self._tail = b""
        self._guard.headed(self)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
