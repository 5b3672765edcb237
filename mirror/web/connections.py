"""Connection limits below HTTP: a cap on open connections, and a deadline for a request head.

Each accepted connection's protocol (aiohttp's request handler) is wrapped in a
`GuardedConnection`, which watches the bytes go by without parsing them:

- a request head (up to its blank line) must be complete within `header_timeout` of the
  connection opening, or of its own first byte on a kept-alive connection, else the
  connection is dropped: a slowloris client, which sends a header byte now and then, holds
  a connection for that long at most. (The mirror serves GET and HEAD only: bytes after a
  head are the next head.) A kept-alive connection that sends nothing is aiohttp's to
  close, after `keepalive_timeout`;
- at most `max_connections` are open. At the cap a newcomer gets in by closing, in turn:
  1. the connection that has waited longest for an unfinished head, aborted (reason
     "evicted"): a real client sends its head at once, so those are the slow ones, and
     what they ask is not asked yet;
  2. else the one idle in keep-alive longest, closed gracefully (reason "idle"): every
     response written out (its handler says so: keepalive.py), nothing received since,
     nothing left in its transport's buffer. HTTP/1.1 clients retry a request on a
     kept-alive connection that closes (nginx reuses idle keep-alive connections the
     same way), but it costs a served client a reconnect: hence after the headless;
  3. else the newcomer is refused with a 503. A connection with a request in flight (a
     blob streaming, by sendfile or not) is never closed to make room.
  So under a flood of slow connections `/healthz` and real clients still get in, and
  clients that asked once and went quiet (daemons after a pull, or a hoarder) cannot lock
  new ones out until `keepalive_timeout`.

The wrapped protocol writes through a `HeldWrites` (net/heldwrites.py): the small writes
of every connection in one loop turn leave together at its end.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from mirror.net.heldwrites import HeldWrites, TurnWrites
from mirror.observe.guard_metrics import GuardMetrics

# What the wrapped protocol calls when its connection sits idle in keep-alive.
OnIdle = Callable[[], None]
# Makes the wrapped protocol of a new connection, given its OnIdle.
ProtocolFactory = Callable[[OnIdle], asyncio.Protocol]

HEAD_END = b"\r\n\r\n"
# Sent to a connection refused at the cap; small enough for any socket buffer.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


class ConnectionGuard:
    """The open connections, those waiting for an unfinished head (longest first), and
    those idle in keep-alive (longest first)."""

    def __init__(self, max_connections: int, header_timeout: float, metrics: GuardMetrics) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.metrics = metrics
        # Small writes of a loop turn go out at its end, together (net/heldwrites.py).
        self.writes = TurnWrites()
        self._open: set[GuardedConnection] = set()
        # The first entry is the connection waiting longest. An OrderedDict, not a dict:
        # taking a dict's first entry again and again walks the ones deleted before it.
        self._headless: OrderedDict[GuardedConnection, None] = OrderedDict()
        self._idle: OrderedDict[GuardedConnection, None] = OrderedDict()

    def wrap(self, factory: ProtocolFactory) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose connections this guard limits."""
        return lambda: GuardedConnection(self, factory)

    def admit(self, conn: GuardedConnection) -> bool:
        """Count `conn` in, closing a headless or idle one to make room; False: refused."""
        if len(self._open) >= self.max_connections and not self._make_room():
            self.metrics.connections_refused.inc()
            return False
        self._open.add(conn)
        self.metrics.connections_open.set(len(self._open))
        return True

    def _make_room(self) -> bool:
        """Close the oldest headless connection, else the longest idle; False: none is."""
        if self._headless:
            oldest, _ = self._headless.popitem(last=False)
            self.metrics.connections_dropped.labels("evicted").inc()
            oldest.drop()
            return True
        while self._idle:  # each entry is taken once: O(1) a connection, amortized
            longest, _ = self._idle.popitem(last=False)
            if longest.retire():  # else busy since: no longer listed
                self.metrics.connections_dropped.labels("idle").inc()
                return True
        return False

    def waiting(self, conn: GuardedConnection) -> None:
        """`conn` is waiting for a request head: a candidate to drop, after older ones."""
        self._headless[conn] = None

    def headed(self, conn: GuardedConnection) -> None:
        """`conn` has sent a complete request head: no longer a candidate to drop."""
        self._headless.pop(conn, None)

    def idle(self, conn: GuardedConnection) -> None:
        """`conn` sits idle in keep-alive: a candidate to close, after headless ones and
        those idle longer. It stays listed once it receives bytes again (its own flag
        says it is busy), so that a request costs one move here, not a removal too."""
        try:
            self._idle.move_to_end(conn)
        except KeyError:
            self._idle[conn] = None

    def closed(self, conn: GuardedConnection) -> None:
        self._open.discard(conn)
        self._headless.pop(conn, None)
        self._idle.pop(conn, None)
        self.metrics.connections_open.set(len(self._open))


class GuardedConnection(asyncio.Protocol):
    """Passes everything to the wrapped protocol; closes the connection when the guard says."""

    def __init__(self, guard: ConnectionGuard, factory: ProtocolFactory) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a blank line split across reads
        self._admitted = False
        self._closed = False  # by the guard or the peer: it can no longer go idle
        self._resting = False  # idle in keep-alive: nothing received since its last answer
        self._inner = factory(self.went_idle)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport (uvloop's are not).
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(self):
            transport.write(REFUSAL)
            transport.close()
            return
        self._admitted = True
        self._await_head()
        # The guard's own closes go through it too: held bytes leave before a close.
        self._transport = held = HeldWrites(transport, self._guard.writes)
        self._inner.connection_made(held)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        self._resting = False
        if not self._tail and data.endswith(HEAD_END) and self._deadline is None:
            # Nearly every read: one whole head (or several) and nothing after it, on a
            # connection waiting for nothing. Nothing to watch.
            self._inner.data_received(data)
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
        self._closed = True
        self._cancel_deadline()
        self._guard.closed(self)
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def went_idle(self) -> None:
        """The wrapped protocol has answered all it was asked and waits for a request: idle,
        unless bytes of a next head came meanwhile (a deadline running)."""
        if self._deadline is None and not self._closed:
            self._resting = True
            self._guard.idle(self)

    def drop(self) -> None:
        """Close at once, nothing sent: the client has not asked for anything yet."""
        self._closed = True
        self._cancel_deadline()
        self._guard.closed(self)
        if self._transport is not None:
            self._transport.abort()

    def retire(self) -> bool:
        """Close gracefully if idle: no request in flight, no response in the making.

        False, leaving it open, once it has received bytes since its last answer, or
        is closing already, or while its transport still holds bytes of that answer: the
        client is still reading (and closing would keep the descriptor till it had).
        """
        resting, self._resting = self._resting, False
        transport = self._transport
        if not resting or transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size():
            return False
        self._closed = True
        self._guard.closed(self)
        transport.close()
        return True

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
