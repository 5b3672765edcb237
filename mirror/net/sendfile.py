"""A span of a file sent to a plain TCP transport's socket by sendfile(2), on any event loop.

`loop.sendfile` exists on asyncio's loop only: uvloop's raises NotImplementedError, and a
body then goes out copied through the process, about 3x the CPU per byte. This sends on a
duplicate of the transport's socket descriptor instead, so it works the same on both loops:

- the transport's own buffer (the response head) goes out first: nothing is sent until
  `get_write_buffer_size()` is 0, and the caller writes nothing to the transport meanwhile;
- the duplicate is the descriptor waited on for writability (`loop.add_writer`), as uvloop
  refuses a transport's own descriptor there; it is unregistered before it is closed, since
  epoll keeps watching a closed duplicate while the original stays open;
- reading is left alone: a pipelined request is buffered by the protocol as always, and the
  transport's state is untouched for the next response on the connection;
- a client that stops reading is given `timeout` seconds in which none of the bytes sent
  reach it (its acknowledged count, net/progress.py, looked at on each wait's recheck: no
  timer of its own), then SendTimeout: a slow reader is never cut, however long the span;
- the bytes are reported as each call sends them (`on_sent`), so a span cut part way is
  counted for what went out, not for nothing.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

from mirror.net.progress import Stall
from mirror.net.tls import is_tls

# One sendfile call sends at most this, so that other connections get their turn when a
# fast reader keeps the socket writable.
BLOCK = 8 * 1024 * 1024
# A wait for writability wakes this often to notice the transport closed meanwhile (an
# abort elsewhere does not wake a descriptor of our own).
RECHECK = 1.0
# The receiver is gone.
_GONE = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ETIMEDOUT}
# The file or socket cannot be sent from by sendfile: the caller copies instead.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK}
# Told the bytes each sendfile call sent.
OnSent = Callable[[int], None]


class FileEnded(Exception):
    """The file ended before the span did: the body sent is short."""


class SendTimeout(ConnectionError):
    """No byte sent reached the receiver for the time allowed: the caller cuts the
    connection (the receiver stopped reading, or its network went)."""


def socket_fd(transport: asyncio.BaseTransport) -> int | None:
    """The descriptor of a plain (not TLS) transport's socket; None where there is none."""
    if is_tls(transport):
        return None  # bytes written to the socket itself would bypass the encryption
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    return fd if isinstance(fd, int) and fd >= 0 else None


async def sendfile(
    transport: asyncio.WriteTransport,
    file: int,
    offset: int,
    count: int,
    timeout: float | None = None,
    on_sent: OnSent | None = None,
) -> None:
    """Send `count` bytes of the file descriptor `file` from `offset` after what `transport`
    holds, telling `on_sent` of each part sent. Raises NotImplementedError before anything
    is sent where sendfile cannot be used, ConnectionResetError when the receiver goes away
    or the transport closes, FileEnded, SendTimeout when none of the bytes reach the
    receiver for `timeout` seconds."""
    if transport.is_closing():
        raise ConnectionResetError("the connection was closed")
    fd = socket_fd(transport)
    if fd is None:
        raise NotImplementedError("no plain socket to send to")
    own = os.dup(fd)
    try:
        loop = asyncio.get_running_loop()
        wait = _Wait(loop, own, transport, None if timeout is None else Stall(timeout))
        while transport.get_write_buffer_size():
            await wait.writable()
        await _send(wait, (file, offset, count), on_sent)
    finally:
        os.close(own)


async def _send(wait: _Wait, span: tuple[int, int, int], on_sent: OnSent | None) -> None:
    """The span (file, offset, count) in blocks, waiting for the socket between them."""
    file, offset, count = span
    own = wait.own
    first = True
    while count > 0:
        try:
            sent = os.sendfile(own, file, offset, min(count, BLOCK))
        except BlockingIOError:
            sent = -1
        except OSError as exc:
            raise _translated(exc, first) from exc
        if sent == 0:
            raise FileEnded(f"the file ended {count} bytes before the span")
        if sent > 0:
            first = False
            offset, count = offset + sent, count - sent
            if on_sent is not None:
                on_sent(sent)
        if count > 0:  # the socket is full, or other connections are due a turn
            await wait.writable()


def _translated(exc: OSError, first: bool) -> Exception:
    if exc.errno in _GONE:
        return ConnectionResetError("the receiver went away")
    if first and exc.errno in _UNSUPPORTED:
        return NotImplementedError(f"sendfile: {exc.strerror}")
    return exc


class _Wait:
    """Waits for the duplicate descriptor `own` to take more bytes, watching the receiver."""

    __slots__ = ("loop", "own", "transport", "stall")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        own: int,
        transport: asyncio.BaseTransport,
        stall: Stall | None,
    ) -> None:
        self.loop, self.own, self.transport, self.stall = loop, own, transport, stall

    async def writable(self) -> None:
        """Until the socket takes more bytes (or RECHECK passes); raises
        ConnectionResetError when the transport is closing (the client left, or the server
        cut it), SendTimeout when the receiver has taken nothing for the time allowed."""
        loop, own = self.loop, self.own
        waiter: asyncio.Future[bool] = loop.create_future()
        loop.add_writer(own, _wake, waiter, True)
        timer = loop.call_later(RECHECK, _wake, waiter, False)
        try:
            writable = await waiter
        finally:
            timer.cancel()
            loop.remove_writer(own)
        if self.transport.is_closing():
            raise ConnectionResetError("the connection was closed")
        # Only a wait that ran out asks the kernel: a socket that turned writable took bytes.
        if not writable and self.stall is not None:
            if self.stall.overdue(self.transport, loop.time()):
                raise SendTimeout(f"the receiver took nothing for {self.stall.limit:g}s")


def _wake(waiter: asyncio.Future[bool], writable: bool) -> None:
    if not waiter.done():
        waiter.set_result(writable)
