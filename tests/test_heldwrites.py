"""net/heldwrites.py on real TCP connections, on asyncio's loop and uvloop: small writes
leave at the end of the loop turn, every connection's at once; a large write, a question
about what is unsent and a close send the held bytes first, in order; an abort drops them;
a buffer reused by the writer changes nothing sent."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from mirror.net.heldwrites import HOLD_LIMIT, HeldWrites, TurnWrites

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    factory = None
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    def go(test: Callable[[], Awaitable[None]]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(test())  # type: ignore[arg-type]

    yield go


@asynccontextmanager
async def connection(turn: TurnWrites) -> AsyncIterator[tuple[HeldWrites, socket.socket]]:
    """Our end (a transport, held) and the peer's socket (non-blocking), on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    held = HeldWrites(transport, turn)  # type: ignore[arg-type]
    try:
        yield held, theirs
    finally:
        transport.abort()
        theirs.close()


def received(peer: socket.socket) -> bytes:
    """What has reached the peer so far (b"" for nothing yet)."""
    got = b""
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return got
        if not data:
            return got
        got += data


async def eventually_received(peer: socket.socket, size: int) -> bytes:
    got = b""
    for _ in range(200):
        got += received(peer)
        if len(got) >= size:
            break
        await asyncio.sleep(0.005)
    return got


def test_small_writes_leave_at_the_end_of_the_turn(run: Run) -> None:
    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            held.write(b"HTTP/1.1 200 OK\r\n")
            held.writelines([b"Content-Length: 2\r\n\r\n", b"{}"])
            assert received(peer) == b""  # held: the turn is not over
            await asyncio.sleep(0)
            assert await eventually_received(peer, 40) == (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            )

    run(test)


def test_every_connection_of_a_turn_is_sent_at_once(run: Run) -> None:
    async def test() -> None:
        turn = TurnWrites()
        async with (
            connection(turn) as (first, one),
            connection(turn) as (second, two),
            connection(turn) as (third, three),
        ):
            for i, held in enumerate((first, second, third)):
                held.write(b"answer %d" % i)
            assert [received(peer) for peer in (one, two, three)] == [b"", b"", b""]
            await asyncio.sleep(0)
            got = [await eventually_received(peer, 8) for peer in (one, two, three)]
            assert got == [b"answer 0", b"answer 1", b"answer 2"]

    run(test)


def test_a_large_write_sends_what_waits_first_and_goes_straight_on(run: Run) -> None:
    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            held.write(b"head")
            body = b"x" * (HOLD_LIMIT + 1)
            held.write(body)
            first = received(peer)  # before the turn ends
            assert first.startswith(b"headxxx")
            rest = await eventually_received(peer, len(body) + 4 - len(first))
            assert first + rest == b"head" + body

    run(test)


def test_asking_what_is_unsent_sends_it(run: Run) -> None:
    """As net/sendfile.py does before its bytes bypass the transport."""

    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            held.write(b"head")
            assert held.get_write_buffer_size() == 0
            assert received(peer) == b"head"

    run(test)


def test_a_close_sends_what_is_held_then_ends(run: Run) -> None:
    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            held.write(b"last answer")
            held.close()
            got = await eventually_received(peer, 11)
            assert got == b"last answer"
            await asyncio.sleep(0.05)
            assert peer.recv(10) == b""  # the end

    run(test)


def test_an_abort_drops_what_is_held(run: Run) -> None:
    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            held.write(b"never sent")
            held.abort()
            await asyncio.sleep(0.05)
            try:
                assert peer.recv(100) == b""
            except ConnectionResetError:
                pass

    run(test)


def test_a_buffer_reused_by_the_writer_changes_nothing_sent(run: Run) -> None:
    async def test() -> None:
        async with connection(TurnWrites()) as (held, peer):
            buffer = bytearray(b"first")
            held.write(buffer)
            held.writelines([memoryview(buffer)])
            buffer[:] = b"XXXXX"
            await asyncio.sleep(0)
            assert await eventually_received(peer, 10) == b"firstfirst"

    run(test)
