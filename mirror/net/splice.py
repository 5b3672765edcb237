"""A plain-HTTP GET whose body goes from the socket into a file by splice(2).

Read through the process, a body costs a copy out of the kernel, a bytes object and an
event-loop turn per piece received, and a copy back into the file. splice(2) moves it from
the socket through a pipe into the file inside the kernel, in a worker thread; the event
loop only hears how far it got. (A 512 MiB object from Ceph RGW: 0.32-0.35 CPU-seconds,
against 0.64-0.96 read through aiohttp.)

Plain HTTP with a known Content-Length only: over TLS the bytes must be decrypted in the
process. The response head is read by http.client, the standard library's parser; only
the body is spliced. Every call here blocks: run them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import select
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

# Bytes moved per splice pair: the pipe is grown to this where the system allows.
PIPE_SIZE = 1024 * 1024
# Progress is reported (a wake-up of the event loop, and a sendfile after it) per this
# many bytes landed, and at the end: a socket read brings 64-256 KiB at a time.
REPORT_EVERY = 4 * 1024 * 1024
# A wait for the socket looks at the stop flag this often (seconds).
POLL_SLICE = 0.25
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux


class BodyBroken(Exception):
    """The sender stopped, closed or overran before the body's length was in."""


class Stopped(Exception):
    """The caller asked the splice to stop."""


def can_splice(url: str) -> bool:
    """Can a GET of `url` be spliced: plain HTTP, no proxy in the way, on a system with
    splice(2)?"""
    parts = urlsplit(url)
    if parts.scheme != "http" or not hasattr(os, "splice") or parts.hostname is None:
        return False
    # A proxy from the environment would be used by the S3 client: keep to it then.
    return "http" not in urllib.request.getproxies() or bool(
        urllib.request.proxy_bypass(parts.hostname)
    )


class SplicedGet:
    """One GET: `open` reads the status and head, `splice_into` lands the body in a file."""

    def __init__(
        self,
        url: str,
        timeout: float,
        connect_timeout: float | None = None,
        head_timeout: float | None = None,
    ) -> None:
        parts = urlsplit(url)
        self._target = parts.path + ("?" + parts.query if parts.query else "")
        self._timeout = timeout  # the longest wait for the next byte of the body
        # From the start of `open` to the answer's head, connecting included: a server
        # that takes the request and never answers is given up on after this.
        self._head_timeout = head_timeout or timeout
        self._conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=connect_timeout or timeout
        )
        self._response: http.client.HTTPResponse | None = None
        self.status = 0
        self.length: int | None = None  # Content-Length, when sent and not chunked

    def open(self) -> None:
        """Send the request and read the response head (blocking). Each wait for the head
        ends within `head_timeout` of the start (TimeoutError)."""
        started = time.monotonic()
        self._conn.connect()
        sock = self._conn.sock
        if sock is not None:
            left = self._head_timeout - (time.monotonic() - started)
            sock.settimeout(max(left, 0.001))  # 0 would make it non-blocking
        self._conn.request("GET", self._target, headers={"Accept-Encoding": "identity"})
        response = self._conn.getresponse()
        if sock is not None:
            sock.settimeout(self._timeout)
        self._response, self.status = response, response.status
        if not response.chunked and response.length is not None:
            self.length = response.length

    def splice_into(self, fd: int, progress: Callable[[int], None], stop: threading.Event) -> int:
        """Write the body to `fd` from offset 0, calling `progress(bytes in the file)` as it
        lands (blocking). Raises BodyBroken (the socket's fault), Stopped, or OSError (the
        file's fault: the disk refused)."""
        response, length = self._response, self.length
        if response is None or length is None:
            raise BodyBroken("no response of known length to splice")
        done = _take_buffered(response, fd, length)
        progress(done)
        sock = self._conn.sock
        if done == length:
            return done
        if sock is None:
            raise BodyBroken("the connection is gone")
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
                fcntl.fcntl(writer, _F_SETPIPE_SZ, PIPE_SIZE)
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            reported, lowat = done, 0
            while done < length:
                lowat = _wake_at(sock, min(PIPE_SIZE, length - done), lowat)
                moved = self._from_socket(sock.fileno(), writer, length - done, poller, stop)
                _pipe_to_file(reader, fd, moved, done)
                done += moved
                if done - reported >= REPORT_EVERY or done == length:
                    progress(done)
                    reported = done
        finally:
            os.close(reader)
            os.close(writer)
        return done

    def _from_socket(
        self, sock: int, pipe: int, left: int, poller: select.poll, stop: threading.Event
    ) -> int:
        """Some bytes (at most `left`) from the socket into the empty pipe."""
        deadline = time.monotonic() + self._timeout
        while True:
            if stop.is_set():
                raise Stopped
            try:
                moved = os.splice(
                    sock, pipe, min(left, PIPE_SIZE), flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
                )
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BodyBroken(f"no bytes for {self._timeout:g}s") from None
                poller.poll(POLL_SLICE * 1000)
                continue
            except OSError as exc:
                raise BodyBroken(exc.strerror or type(exc).__name__) from None
            if moved == 0:
                raise BodyBroken("the sender closed the connection")
            return moved

    def close(self) -> None:
        """Close the connection (never reused: its state is the kernel's now)."""
        self._conn.close()


def _take_buffered(response: http.client.HTTPResponse, fd: int, length: int) -> int:
    """The body bytes http.client buffered with the head, written at offset 0: after them,
    the socket holds the rest. Returns their count."""
    try:
        held = response.fp.peek(1) if length else b""  # one read at most, when none are held
        response.fp.read(len(held))
    except OSError as exc:
        raise BodyBroken(exc.strerror or type(exc).__name__) from None
    if len(held) > length:
        raise BodyBroken("the sender sent more than its Content-Length")
    view, written = memoryview(held), 0
    while written < len(held):
        written += os.pwrite(fd, view[written:], written)
    return written


def _wake_at(sock: socket.socket, size: int, current: int) -> int:
    """Have the socket ready for reading once `size` bytes wait (SO_RCVLOWAT), not at
    every segment: a pipe's worth per splice, a quarter fewer CPU-seconds. A slower sender
    is still read each POLL_SLICE, whatever has come. Returns the mark now set."""
    if size != current:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    return size


def _pipe_to_file(pipe: int, fd: int, count: int, offset: int) -> None:
    """`count` bytes from the pipe into the file at `offset`."""
    while count:
        moved = os.splice(pipe, fd, count, offset_dst=offset, flags=os.SPLICE_F_MOVE)
        if moved == 0:
            raise OSError("splice into the file moved nothing")
        count -= moved
        offset += moved
