"""What the send timeout measures (mirror/net/progress.py): the bytes a TCP peer has
acknowledged, read from the kernel, which stand still while the peer reads nothing and move
as soon as it reads, however full the sender's buffer is."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mirror.net.progress import Stall, acknowledged


class SocketTransport(asyncio.Transport):
    """Just what `acknowledged` asks of a transport: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default


@pytest.fixture
def stalled() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver) over loopback: the sender's buffer full, the receiver's window shut."""
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = socket.socket()
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receiver.connect(listener.getsockname())
    sender, _ = listener.accept()
    listener.close()
    sender.setblocking(False)
    try:
        while True:
            sender.send(bytes(64 * 1024))
    except BlockingIOError:
        pass
    time.sleep(0.2)  # what can travel has travelled
    yield sender, receiver
    sender.close()
    receiver.close()


def test_acknowledged_stands_still_until_the_peer_reads(
    stalled: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = stalled
    transport = SocketTransport(sender)
    before = acknowledged(transport)
    assert before is not None and before > 0  # the receiver's window took some
    time.sleep(0.3)
    assert acknowledged(transport) == before

    receiver.recv(64 * 1024)
    time.sleep(0.2)

    after = acknowledged(transport)
    assert after is not None and after > before


def test_a_stall_is_overdue_only_after_its_limit_without_a_byte(
    stalled: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = stalled
    transport = SocketTransport(sender)
    stall = Stall(2.0)
    assert not stall.overdue(transport, 100.0)  # the first look: the count seen from now
    assert not stall.overdue(transport, 101.9)
    assert stall.overdue(transport, 102.0)

    receiver.recv(64 * 1024)
    time.sleep(0.2)

    assert not stall.overdue(transport, 103.0)  # it moved: from now again
    assert not stall.overdue(transport, 104.9)
    assert stall.overdue(transport, 105.0)


def test_a_transport_without_a_tcp_socket_is_never_overdue() -> None:
    left, right = socket.socketpair()  # AF_UNIX: no TCP_INFO
    with left, right:
        stall = Stall(1.0)
        transport = SocketTransport(left)
        assert acknowledged(transport) is None
        assert not stall.overdue(transport, 0.0)
        assert not stall.overdue(transport, 1000.0)
