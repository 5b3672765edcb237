"""Connection limits below HTTP: a cap on open connections, a deadline for a request head,
and one for a client to take any of the bytes sent to it.

Each accepted connection's protocol (aiohttp's request handler) is wrapped in a
`GuardedConnection`, which watches the bytes go by without parsing them:

- a request head (up to its blank line) must be complete within `header_timeout` of the
  connection opening, or of its own first byte on a kept-alive connection, else the
  connection is dropped: a slowloris client, which sends a header byte now and then, holds
  a connection for that long at most. (The mirror serves GET and HEAD only: bytes after a
  head are the next head. Empty lines where a head would start, which aiohttp skips, end
  no head.) A kept-alive connection that sends nothing is aiohttp's to close, after
  `keepalive_timeout`;
- at most `max_connections` are open. At the cap a newcomer gets in by closing, in turn:
  1. the connection that has waited longest for an unfinished head, aborted (reason
     "evicted"): a real client sends its head at once, so those are the slow ones, and
     what they ask is not asked yet;
  2. else the one idle in keep-alive longest, closed gracefully (reason "idle"): every
     response written out (its handler says so: keepalive.py), nothing received since,
     nothing left in its transport's buffer. HTTP/1.1 clients retry a request on a
     kept-alive connection that closes (nginx reuses idle keep-alive connections the
     same way), but it costs a served client a reconnect: hence after the headless;
  3. else the newcomer is refused with a 503, once its head shows it is not a health
     probe: a GET or HEAD of `/healthz` or `/readyz` is answered past the cap, on one of
     PROBE_RESERVE places, and its connection closed after the answer (a liveness probe
     that found the mirror merely full would have it restarted, every stream with it).
     A connection with a request in flight (a blob streaming, by sendfile or not) is
     never closed to make room.
  So under a flood of slow connections `/healthz` and real clients still get in, and
  clients that asked once and went quiet (daemons after a pull, or a hoarder) cannot lock
  new ones out until `keepalive_timeout`;
- a client that stops reading its answer is cut (aborted, reason "send_timeout") once none
  of the bytes waiting for it reach it for `send_timeout`: a connection with a request in
  flight is not closed for room, so without this clients that never read would hold their
  places for ever. A body sent by sendfile (the transport's buffer empty) is watched by
  its sender (net/sendfile.py, reporting here through `cut_stalled`); every other write
  (copied and TLS bodies, relays, manifests, an answer left unsent at a close) waits in
  the transport's buffer, which the guard looks at once a second: the count of bytes the
  client acknowledged (net/progress.py) must move. A slow client that keeps reading is
  never cut, however long its answer takes.

On the HTTPS listener the guard is served without ssl= (asyncio and uvloop would hand it
a connection only once its handshake was done, so connections in theirs were neither
counted nor closable): it counts each connection from its accept, as on plain HTTP, then
gives it to the loop's own TLS protocol (net/tls.py `server_tls`, the one ssl= would have
set there: no byte takes another path) with itself as that protocol's app protocol. The
handshake runs on the first head's deadline (`header_timeout` from the accept), and a
connection in its handshake is closed for room as a headless one is. A newcomer refused
before its handshake (no place, or a probe's head late) is closed without a word: no 503
can be said before a handshake.

The wrapped protocol writes through a `HeldWrites` (net/heldwrites.py): the small writes
of every connection in one loop turn leave together at its end.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from mirror.net.heldwrites import HeldWrites, TurnWrites
from mirror.net.progress import Stall
from mirror.net.tls import server_tls
from mirror.observe.guard_metrics import GuardMetrics

log = logging.getLogger(__name__)

# What the wrapped protocol calls when its connection sits idle in keep-alive.
OnIdle = Callable[[], None]
# Makes the wrapped protocol of a new connection, given its OnIdle.
ProtocolFactory = Callable[[OnIdle], asyncio.Protocol]

HEAD_END = b"\r\n\r\n"
# What a parser skips where a request line may start (RFC 9112 2.2; aiohttp's llhttp skips
# any CR or LF there): empty lines end no head.
BLANK = b"\r\n"
# Sent to a connection refused at the cap; small enough for any socket buffer.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)
# Places past the cap for connections whose head may be a health probe (they send it at
# once: a second is plenty), and what such a head may be.
PROBE_RESERVE = 8
PROBE_HEAD_WAIT = 1.0
PROBE_HEAD_MAX = 8192
PROBE_METHODS = (b"GET", b"HEAD")
PROBE_PATHS = (b"/healthz", b"/readyz")
# How often the guard looks at what its connections have not sent yet.
LOOK_INTERVAL = 1.0
# At most one log line this often for connections cut at the send timeout (a flood of
# clients that never read must not flood the log); the next line counts the others.
CUT_LOG_INTERVAL = 10.0


class ConnectionGuard:
    """The open connections, those waiting for an unfinished head (longest first), and
    those idle in keep-alive (longest first)."""

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        metrics: GuardMetrics,
        send_timeout: float = 60.0,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.metrics = metrics
        # Small writes of a loop turn go out at its end, together (net/heldwrites.py).
        self.writes = TurnWrites()
        self._open: set[GuardedConnection] = set()
        # The first entry is the connection waiting longest. An OrderedDict, not a dict:
        # taking a dict's first entry again and again walks the ones deleted before it.
        self._headless: OrderedDict[GuardedConnection, None] = OrderedDict()
        self._idle: OrderedDict[GuardedConnection, None] = OrderedDict()
        self._looking: asyncio.TimerHandle | None = None  # the next look, while any are open
        self._probing: set[GuardedConnection] = set()  # past the cap, their head awaited
        self._cuts_unlogged = 0
        self._next_cut_log = 0.0

    def wrap(
        self, factory: ProtocolFactory, tls: ssl.SSLContext | None = None
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose connections this guard limits; given `tls`, for a
        listener served without ssl=, their TLS handshakes are its own to do."""
        return lambda: GuardedConnection(self, factory, tls)

    def admit(self, conn: GuardedConnection) -> bool:
        """Count `conn` in, closing a headless or idle one to make room; False: no room."""
        if len(self._open) >= self.max_connections and not self._make_room():
            return False
        self.count_in(conn)
        return True

    def may_probe(self, conn: GuardedConnection) -> bool:
        """Hold `conn`, found no room, until its head says whether it is a health probe;
        False, and counted refused, when the places for those are taken too."""
        if len(self._probing) >= PROBE_RESERVE:
            self.refused()
            return False
        self._probing.add(conn)
        return True

    def probed(self, conn: GuardedConnection, probe: bool) -> None:
        """`conn`'s head came: a probe is counted in past the cap, the rest refused."""
        self._probing.discard(conn)
        if probe:
            self.count_in(conn)
        else:
            self.refused()

    def refused(self) -> None:
        self.metrics.connections_refused.inc()

    def count_in(self, conn: GuardedConnection) -> None:
        self._open.add(conn)
        self.metrics.connections_open.set(len(self._open))
        if self._looking is None:
            self._looking = asyncio.get_running_loop().call_later(LOOK_INTERVAL, self._look)

    def _look(self) -> None:
        """Cut each connection whose client has taken none of its unsent bytes for
        send_timeout; again in a second while any connection is open."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self._open):  # a cut one leaves the set
            conn.look(now)
        self._looking = loop.call_later(LOOK_INTERVAL, self._look) if self._open else None

    def cut(self, peer: str) -> None:
        """Count (and log, a line every CUT_LOG_INTERVAL at most) a connection cut at the
        send timeout."""
        self.metrics.connections_dropped.labels("send_timeout").inc()
        self._cuts_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now < self._next_cut_log:
            return
        self._next_cut_log = now + CUT_LOG_INTERVAL
        more = self._cuts_unlogged - 1
        self._cuts_unlogged = 0
        log.info(
            "cut the connection from %s: it took no byte of its answer for %gs "
            "(server.send_timeout)%s",
            peer, self.send_timeout, f"; {more} more since the last such line" if more else "",
        )  # fmt: skip

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
        self._probing.discard(conn)
        self._open.discard(conn)
        self._headless.pop(conn, None)
        self._idle.pop(conn, None)
        self.metrics.connections_open.set(len(self._open))


class GuardedConnection(asyncio.Protocol):
    """Passes everything to the wrapped protocol; closes the connection when the guard says."""

    def __init__(
        self, guard: ConnectionGuard, factory: ProtocolFactory, tls: ssl.SSLContext | None
    ) -> None:
        self._guard = guard
        # The listener's context until the handshake is done: no HTTP can be said before.
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # the transport under the HeldWrites
        self._stall: Stall | None = None  # while its transport holds unsent bytes
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes of a head begun, for a blank line split across reads
        self._admitted = False
        self._probe: bytearray | None = None  # past the cap: the head so far, if a probe
        self._one_answer = False  # a probe let in past the cap: closed once answered
        self._closed = False  # by the guard or the peer: it can no longer go idle
        self._resting = False  # idle in keep-alive: nothing received since its last answer
        # Told of idleness through a weak reference: a bound method would make this and the
        # wrapped protocol a reference cycle, which kept each closed connection (a TLS one's
        # buffers with it: hundreds of KiB after a large body) until a full collection.
        self._inner = factory(_idle_callback(self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport (uvloop's are not).
        transport = cast(asyncio.Transport, transport)
        if self._raw is not None:  # from the TLS protocol: the handshake is done
            self._encrypted(transport)
            return
        self._transport = self._raw = transport
        if self._guard.admit(self):
            self._await_head()  # on TLS, the handshake's time is the head's too
        elif self._guard.may_probe(self):
            self._probe = bytearray()
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(PROBE_HEAD_WAIT, self._probe_ends, None)
        else:
            self._refuse(transport)
            return
        if self._tls is not None:
            self._start_tls(transport, self._tls)
        elif self._probe is None:
            self._let_in(transport)

    def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Give the accepted connection to the loop's TLS protocol, this one its app
        protocol: connection_made again once the handshake is done. Counted from its
        accept, it is dropped at the head's deadline, and closed for room while it lasts,
        as any connection whose head is awaited."""
        loop = asyncio.get_running_loop()
        shaken = loop.create_future()
        shaken.add_done_callback(self._handshake_ended)
        # The guard's deadline, set before, ends it first (and counts it).
        tls = server_tls(loop, self, context, shaken, self._guard.header_timeout)
        transport.set_protocol(tls)
        # Now, not in a later callback: uvloop reads as soon as this returns.
        tls.connection_made(transport)

    def _encrypted(self, transport: asyncio.Transport) -> None:
        self._tls = None
        self._transport = self._raw = transport
        if self._probe is None:
            self._let_in(transport)

    def _handshake_ended(self, shaken: asyncio.Future[None]) -> None:
        """Counted out if the handshake failed: the TLS protocol tells the app protocol of
        no close before it is done."""
        failure = None if shaken.cancelled() else shaken.exception()  # retrieved: no warning
        if self._tls is None:  # done: connection_made came first
            return
        if not self._closed:  # else the guard's doing, counted there
            log.debug("TLS handshake failed: %s", failure or "closed by the client")
        self._gone()

    def _let_in(self, transport: asyncio.Transport) -> None:
        self._admitted = True
        # The guard's own closes go through it too: held bytes leave before a close.
        self._transport = held = HeldWrites(transport, self._guard.writes)
        self._inner.connection_made(held)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._closed = True  # a handshake ending later lets nothing in
        if self._tls is not None:  # no handshake done: nothing can be said
            transport.abort()
            return
        transport.write(REFUSAL)
        transport.close()

    def _read_probe(self, data: bytes) -> None:
        """Gather the head of a connection past the cap, then answer or refuse it."""
        assert self._probe is not None
        self._probe += data
        end = self._probe.find(HEAD_END)
        if end >= 0:
            self._probe_ends(bytes(self._probe[: end + len(HEAD_END)]))
        elif len(self._probe) > PROBE_HEAD_MAX:
            self._probe_ends(None)

    def _probe_ends(self, head: bytes | None) -> None:
        """A health probe's `head` is passed on (and nothing after it); any other, or none
        in time (None), gets the 503."""
        waiting, self._probe = self._probe is not None, None
        self._cancel_deadline()
        transport = self._raw
        if not waiting or transport is None or self._closed:
            return
        probe = head is not None and _is_probe(head)
        self._guard.probed(self, probe)
        if head is None or not probe:
            self._refuse(transport)
            return
        self._one_answer = True
        self._let_in(transport)
        self._inner.data_received(head)

    def data_received(self, data: bytes) -> None:
        if self._probe is not None:
            self._read_probe(data)
            return
        if not self._admitted or self._one_answer:  # a probe's one head is passed on
            return
        self._resting = False
        if self._deadline is None and data.endswith(HEAD_END) and data[0] not in BLANK:
            # Nearly every read: one whole head (or several) and nothing after it, on a
            # connection waiting for nothing. Nothing to watch.
            self._inner.data_received(data)
            return
        self._watch(data)
        self._inner.data_received(data)

    def _watch(self, data: bytes) -> None:
        """Follow the heads in `data`: a head ends at the first blank line after its first
        byte that is no CR or LF. Empty lines where a head would start end nothing (aiohttp
        skips them and answers nothing): a connection sending only those is still waiting
        for a head, on its deadline and first to be closed for room."""
        # `_tail` holds the last bytes of a head begun; empty: none begun.
        seen = self._tail + data if self._tail else data.lstrip(BLANK)
        end = seen.rfind(HEAD_END)
        if end >= 0:
            self._headed()
            seen = seen[end + len(HEAD_END) :].lstrip(BLANK)
            if not seen:  # empty lines after a head: skipped before the answer
                return
        self._await_head()
        self._tail = seen[-(len(HEAD_END) - 1) :]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def went_idle(self) -> None:
        """The wrapped protocol has answered all it was asked and waits for a request: idle,
        unless bytes of a next head came meanwhile (a deadline running). A probe let in
        past the cap is closed: its place is for the next probe."""
        if self._one_answer and not self._closed and self._transport is not None:
            self._closed = True
            self._guard.closed(self)
            self._transport.close()
            return
        if self._deadline is None and not self._closed:
            self._resting = True
            self._guard.idle(self)

    def drop(self) -> None:
        """Close at once (aborted: nothing more is sent): the client has not asked for
        anything yet, or stopped reading."""
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

    @property
    def send_timeout(self) -> float:
        return self._guard.send_timeout

    def look(self, now: float) -> None:
        """Cut the connection if its transport holds bytes for the client and the client
        has acknowledged none for send_timeout (a handler waits for them to drain, or a
        close for them to leave)."""
        raw = self._raw
        if raw is None or not raw.get_write_buffer_size():
            self._stall = None
            return
        if self._stall is None:
            self._stall = Stall(self._guard.send_timeout)
        if self._stall.overdue(raw, now):
            self.timed_out()

    def timed_out(self) -> None:
        """Cut: the client took none of the bytes sent to it for send_timeout (counted and
        logged here, whoever saw it)."""
        if self._closed or self._transport is None:
            return
        peer = self._transport.get_extra_info("peername")
        self._guard.cut(str(peer[0]) if isinstance(peer, tuple) and peer else "?")
        self.drop()

    def _gone(self) -> None:
        """Counted out: closed by its client or the guard, or its handshake failed (the
        TLS protocol tells of a close during one to no one)."""
        self._closed = True
        self._cancel_deadline()
        self._guard.closed(self)

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


def cut_stalled(transport: asyncio.Transport) -> None:
    """Cut a connection whose client stopped reading (net/sendfile.py's SendTimeout): by
    its guard, which counts and logs it, where it has one."""
    protocol = transport.get_protocol()
    if isinstance(protocol, GuardedConnection):
        protocol.timed_out()
    else:
        transport.abort()


def send_timeout(transport: asyncio.BaseTransport) -> float | None:
    """The time a client of this connection may take nothing sent to it; None (no limit)
    for a connection no guard watches."""
    protocol = transport.get_protocol()
    return protocol.send_timeout if isinstance(protocol, GuardedConnection) else None


def _idle_callback(conn: GuardedConnection) -> Callable[[], None]:
    """`conn.went_idle`, through a weak reference (nothing once `conn` is gone): a
    reference to the connection itself rather than a WeakMethod, a tenth of its cost on
    every answer."""
    ref = weakref.ref(conn)

    def went_idle() -> None:
        if (alive := ref()) is not None:
            alive.went_idle()

    return went_idle


def _is_probe(head: bytes) -> bool:
    """Whether a request head is a GET or HEAD of a health path (any query)."""
    method, _, rest = head.partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    return method in PROBE_METHODS and target in PROBE_PATHS
