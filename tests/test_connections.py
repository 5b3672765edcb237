"""The connection cap and keep-alive (mirror/web/connections.py): at `server.max_connections`
a newcomer gets in by closing the oldest headless connection, else the one idle in
keep-alive longest; a connection with a request in flight is never closed for room, and
when every one is busy the newcomer gets the 503. A client that stops reading its answer
is cut at `server.send_timeout`; one that reads slowly is not.

A real mirror process, capped at four connections, in front of the fake hub; the clients are
raw kept-alive HTTP/1.1 connections. Each step waits for an answer or a close, never a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
import yaml

from mirror.web.connections import PROBE_HEAD_WAIT, PROBE_RESERVE
from tests.certs import CA, TLSMirror, client_context
from tests.fakehub import FakeHub
from tests.rawclient import HANG, Client, Endpoint
from tests.services import MirrorProcess

CAP = 4
BLOB = os.urandom(32 * 1024 * 1024)  # far more than socket buffers hold: its sending blocks
BLOB_PATH = f"/v2/library/app/blobs/sha256:{hashlib.sha256(BLOB).hexdigest()}"
SMALL = 64 * 1024  # a receive window
UVLOOP = pytest.param(
    "uvloop",
    marks=pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="no uvloop"),
)
# server.send_timeout where the tests wait for it; the default (60s) elsewhere.
SEND_TIMEOUT = 2.0
# server.header_timeout where the tests wait for it; 5 minutes (never reached) elsewhere.
HEADER_TIMEOUT = 1.0
# Enough to outlast the mirror's socket buffer (Linux lets it grow to 4 MiB) by seconds of
# slow reading.
SLOW_BLOB = os.urandom(6 * 1024 * 1024)
SLOW_PATH = f"/v2/library/app/blobs/sha256:{hashlib.sha256(SLOW_BLOB).hexdigest()}"


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture(scope="module")
def mirror_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(params=["asyncio", UVLOOP, "https"])
async def endpoint(
    request: pytest.FixtureRequest, tmp_path: Path, hub: FakeHub
) -> AsyncIterator[Endpoint]:
    """A mirror of four connections at most, on either event loop or over HTTPS (whose
    blob bodies are copied, not sent by sendfile); header_timeout long enough not to act."""
    async with running(request, tmp_path, hub, {}) as served:
        yield served


@pytest.fixture(params=["asyncio", UVLOOP, "https"])
async def impatient(
    request: pytest.FixtureRequest, tmp_path: Path, hub: FakeHub
) -> AsyncIterator[Endpoint]:
    """As `endpoint`, with a send timeout of SEND_TIMEOUT."""
    async with running(request, tmp_path, hub, {"send_timeout": f"{SEND_TIMEOUT:g}s"}) as served:
        yield served


@pytest.fixture(params=["asyncio", UVLOOP, "https"])
async def hasty(
    request: pytest.FixtureRequest, tmp_path: Path, hub: FakeHub
) -> AsyncIterator[Endpoint]:
    """As `endpoint`, with a header timeout of HEADER_TIMEOUT."""
    limits = {"header_timeout": f"{HEADER_TIMEOUT:g}s"}
    async with running(request, tmp_path, hub, limits) as served:
        yield served


@pytest.fixture(params=["https", "https/asyncio"])
async def tls_endpoint(
    request: pytest.FixtureRequest, tmp_path: Path, hub: FakeHub
) -> AsyncIterator[Endpoint]:
    """As `endpoint`, over HTTPS only, on either event loop (uvloop's TLS, or asyncio's)."""
    async with running(request, tmp_path, hub, {}) as served:
        yield served


@contextlib.asynccontextmanager
async def running(
    request: pytest.FixtureRequest, tmp_path: Path, hub: FakeHub, server: dict[str, str]
) -> AsyncIterator[Endpoint]:
    """The mirror `request.param` names (its loop, or HTTPS), serving BLOB and SLOW_BLOB,
    with `server` over the cap and a header_timeout long enough not to act."""
    hub.content.add_blob(BLOB, "library/app")
    hub.content.add_blob(SLOW_BLOB, "library/app")
    loop = "asyncio" if request.param.endswith("asyncio") else "auto"
    limits = {"max_connections": CAP, "header_timeout": "5m", **server}
    config = {"server": limits, "event_loop": loop}
    if request.param.startswith("https"):
        ca: CA = request.getfixturevalue("mirror_ca")
        pair = ca.issue("mirror")
        tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
        process: MirrorProcess = TLSMirror(tmp_path, hub.registry_url, ca.cert, tls, config)
        where = Endpoint(process.port, None)
        served = Endpoint(cast(TLSMirror, process).tls_port, client_context(ca.cert))
    else:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        args = ["--config", str(tmp_path / "config.yaml")]
        process = MirrorProcess(tmp_path, hub.registry_url, extra_args=args)
        where = served = Endpoint(process.port)
    await asyncio.to_thread(process.start)  # the hub answers on this loop meanwhile
    try:
        await settled(where)
        yield served
    finally:
        await asyncio.to_thread(process.stop)


async def settled(where: Endpoint) -> None:
    """Returns once the mirror holds no connection: its readiness probes' are closed."""
    probe = await Client.open(where)
    while await probe.metric("mirror_connections_open") > 1:  # more than the probe
        await asyncio.sleep(0.05)
    assert (await probe.get("/healthz", "Connection: close\r\n"))[0] == 200
    assert await probe.closed()  # by the mirror: counted out before the next is let in
    await probe.close()


@pytest.fixture
async def connect(endpoint: Endpoint) -> AsyncIterator[Connect]:
    """Opens a Client to the mirror (keyword arguments: Client.open's); all closed after."""
    async with connecting(endpoint) as opened:
        yield opened


@pytest.fixture
async def connect_impatient(impatient: Endpoint) -> AsyncIterator[Connect]:
    """As `connect`, to the mirror with a short send timeout."""
    async with connecting(impatient) as opened:
        yield opened


@contextlib.asynccontextmanager
async def connecting(endpoint: Endpoint) -> AsyncIterator[Connect]:
    clients: list[Client] = []

    async def opened(**options: int) -> Client:
        clients.append(await Client.open(endpoint, **options))
        return clients[-1]

    yield opened
    for client in clients:
        await client.close()


async def asked_once(connect: Connect, count: int) -> list[Client]:
    """`count` connections that each got an answer, then sit idle, the first longest."""
    clients = []
    for _ in range(count):
        client = await connect()
        assert (await client.get("/healthz"))[0] == 200
        clients.append(client)
    return clients


async def dropped(client: Client, reason: str) -> float:
    return await client.metric("mirror_connections_dropped_total", reason=reason)


async def test_idle_connections_make_room_the_longest_idle_first(connect: Connect) -> None:
    idle = await asked_once(connect, CAP)

    newcomer = await connect()
    answer = await newcomer.get("/healthz")

    assert answer[0] == 200
    assert await idle[0].closed()
    for client in idle[1:]:  # the others are still open
        assert (await client.get("/healthz"))[0] == 200
    assert await dropped(newcomer, "idle") == 1
    assert await dropped(newcomer, "evicted") == 0
    assert await newcomer.metric("mirror_connections_refused_total") == 0


async def test_a_blob_in_flight_is_never_closed_for_room(connect: Connect) -> None:
    cacher = await connect()
    assert await cacher.get(BLOB_PATH) == (200, BLOB)  # cached: by sendfile from now on (HTTP)
    slow = await connect(rcvbuf=SMALL)
    status, headers = await slow.ask(BLOB_PATH)  # then reads no further: the sending blocks
    assert status == 200
    later = await asked_once(connect, 2)
    # Open: cacher (idle), slow (busy, older than every idle one but cacher), later (idle).

    newcomers = await asked_once(connect, CAP)  # each answered: each made room

    for client in [cacher, *later, newcomers[0]]:
        assert await client.closed()
    assert await slow.body(headers) == BLOB  # whole: never closed
    assert await dropped(newcomers[-1], "idle") == CAP


async def test_when_every_connection_is_busy_the_newcomer_gets_a_503(
    connect: Connect,
) -> None:
    busy = [await connect(rcvbuf=SMALL) for _ in range(CAP)]
    assert await busy[0].get(BLOB_PATH) == (200, BLOB)  # cached: by sendfile from now on (HTTP)
    pending = [await client.ask(BLOB_PATH) for client in busy]  # none read further

    newcomer = await connect()
    refusal = await asyncio.wait_for(newcomer.reader.read(), HANG)

    assert refusal.startswith(b"HTTP/1.1 503")
    for client, (status, headers) in zip(busy, pending, strict=True):
        assert status == 200
        assert await client.body(headers) == BLOB
    assert await busy[0].metric("mirror_connections_refused_total") == 1
    assert await dropped(busy[0], "idle") == 0


async def test_headless_connections_make_room_before_idle_ones(connect: Connect) -> None:
    first = await asked_once(connect, 1)
    headless = await connect()
    headless.send(b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n")  # and never the blank line
    idle = first + await asked_once(connect, 2)

    one = await connect()
    assert (await one.get("/healthz"))[0] == 200
    assert await headless.closed()
    assert (await idle[0].get("/healthz"))[0] == 200  # still open: idle since just now
    two = await connect()
    assert (await two.get("/healthz"))[0] == 200

    assert await idle[1].closed()  # idle longest by then
    assert (await idle[2].get("/healthz"))[0] == 200
    assert await dropped(two, "evicted") == 1
    assert await dropped(two, "idle") == 1


async def test_empty_lines_are_no_head_and_make_room(connect: Connect) -> None:
    """aiohttp skips empty lines where a request line may start and answers nothing:
    connections that send only those (new ones, and kept-alive ones after an answer) are
    still waiting for a head, and closed first for room. They held their places for
    good, and newcomers got the 503."""
    blank = [await connect() for _ in range(CAP // 2)]
    blank += await asked_once(connect, CAP - len(blank))
    for client in blank:
        client.send(b"\r\n\r\n")

    for _ in range(CAP):  # each made room
        newcomer = await connect()
        assert (await newcomer.get("/v2/"))[0] == 200  # no probe: no place past the cap

    for client in blank:
        assert await client.closed()
    assert await dropped(newcomer, "evicted") == CAP
    assert await dropped(newcomer, "idle") == 0
    assert await newcomer.metric("mirror_connections_refused_total") == 0


async def test_empty_lines_do_not_stop_the_head_deadline(hasty: Endpoint) -> None:
    async with connecting(hasty) as connect:
        new = await connect()
        new.send(b"\r\n\r\n")
        kept = (await asked_once(connect, 1))[0]
        kept.send(b"\r\n\r\n")

        assert await new.closed()  # at the header timeout, not keep-alive's 75 s
        assert await kept.closed()
        probe = await connect()
        assert await dropped(probe, "header_timeout") == 2


async def test_connections_in_their_tls_handshake_count_and_make_room(
    tls_endpoint: Endpoint,
) -> None:
    """The loop handed a TLS connection over once its handshake was done: silent TCP
    connections to the HTTPS port were neither counted nor closed for room (200 held 200
    descriptors past a cap of 20, /metrics saying 1 open) until the handshake timeout."""
    flood = 10 * CAP
    silent = [await Client.open(Endpoint(tls_endpoint.port)) for _ in range(flood)]
    for client in silent[:-CAP]:  # each newcomer closed the oldest to get in
        assert await client.closed()

    async with connecting(tls_endpoint) as connect:
        newcomer = await connect()  # its handshake done, in the place of one more
        assert (await newcomer.get("/v2/"))[0] == 200
        assert await silent[-CAP].closed()
        assert await newcomer.metric("mirror_connections_open") == CAP
        assert await dropped(newcomer, "evicted") == flood - CAP + 1
    for client in silent:
        await client.close()


async def test_a_connection_silent_from_its_accept_is_dropped_at_the_header_timeout(
    hasty: Endpoint,
) -> None:
    """Over HTTPS too, where it never begins its handshake, and counted so."""
    silent = await Client.open(Endpoint(hasty.port))  # TCP only
    assert await silent.closed()
    await silent.close()
    async with connecting(hasty) as connect:
        assert await dropped(await connect(), "header_timeout") == 1


async def busy_at_the_cap(connect: Connect) -> list[Client]:
    """CAP connections each with a blob in flight that its client reads no further."""
    busy = [await connect(rcvbuf=SMALL) for _ in range(CAP)]
    assert await busy[0].get(BLOB_PATH) == (200, BLOB)  # cached: by sendfile from now on (HTTP)
    for client in busy:
        assert (await client.ask(BLOB_PATH))[0] == 200
    return busy


async def test_at_the_cap_health_probes_are_answered_and_nothing_else(
    connect: Connect,
) -> None:
    """A liveness probe refused because the mirror was merely full had it restarted, every
    blob stream with it. Past the cap a probe's head is answered; any other is the 503."""
    await busy_at_the_cap(connect)

    for path in ("/healthz", "/readyz", "/healthz?verbose=1"):
        probe = await connect()
        status, headers = await probe.ask(path)
        assert status == 200, path
        await probe.body(headers)
        assert await probe.closed()  # after its one answer: the place is for the next probe
    head = await connect()
    head.send(b"HEAD /healthz HTTP/1.1\r\nHost: mirror\r\n\r\n")
    assert (await asyncio.wait_for(head.reader.read(), HANG)).startswith(b"HTTP/1.1 200")

    for path in ("/v2/", "/metrics", "/healthzz", "/v2/library/app/manifests/latest"):
        other = await connect()
        other.send(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
        answer = await asyncio.wait_for(other.reader.read(), HANG)
        assert answer.startswith(b"HTTP/1.1 503"), path

    # A request behind a probe's, in the same write, is not served past the cap.
    sneaky = await connect()
    sneaky.send(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
    answer = await asyncio.wait_for(sneaky.reader.read(), HANG)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 200")


async def test_the_places_for_probes_are_few_and_a_silent_one_is_refused_soon(
    endpoint: Endpoint, connect: Connect
) -> None:
    await busy_at_the_cap(connect)
    silent = [await connect() for _ in range(PROBE_RESERVE)]  # each holds a place
    started = time.monotonic()
    if endpoint.context is None:
        beyond = await connect()
        assert (await asyncio.wait_for(beyond.reader.read(), HANG)).startswith(b"HTTP/1.1 503")
    else:  # nothing can be said before a handshake: closed at its accept, none begun
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await connect()
    assert time.monotonic() - started < PROBE_HEAD_WAIT  # at once: no place left
    for client in silent:  # refused once their head is overdue
        assert (await asyncio.wait_for(client.reader.read(), HANG)).startswith(b"HTTP/1.1 503")
    assert time.monotonic() - started < PROBE_HEAD_WAIT + 5
    probe = await connect()  # their places are free again
    assert (await probe.get("/healthz"))[0] == 200


async def answered(connect: Connect) -> float:
    """Seconds until a newcomer gets /v2/'s 200 (503s meanwhile: every place taken; not
    /healthz, which a probe gets past the cap)."""
    started = time.monotonic()
    while True:
        client = await connect()
        client.send(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n")
        try:
            answer = await asyncio.wait_for(client.reader.read(), HANG)
        except ConnectionResetError:  # refused, and closed with the request unread
            answer = b"HTTP/1.1 503"
        await client.close()
        if answer.startswith(b"HTTP/1.1 200"):
            return time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        assert time.monotonic() - started < HANG
        await asyncio.sleep(0.25)


async def rest_of_body(client: Client) -> int:
    """Reads until the connection ends (by a close or a reset): the body bytes it got."""
    got = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(client.reader.read(1 << 20), HANG):
            got += len(chunk)
    return got


async def test_clients_that_never_read_are_cut_at_the_send_timeout(
    connect_impatient: Connect,
) -> None:
    connect = connect_impatient
    stalled = [await connect(rcvbuf=4096) for _ in range(CAP)]
    assert await stalled[0].get(BLOB_PATH) == (200, BLOB)  # cached: by sendfile from now on (HTTP)
    started = time.monotonic()  # no stall can have begun before
    for client in stalled:  # every place taken by a client that reads no further
        assert (await client.ask(BLOB_PATH))[0] == 200
    asked = time.monotonic() - started  # the first stall may have begun as late as this

    await answered(connect)
    waited = time.monotonic() - started

    # Cut once they took nothing for the timeout: not before, and not much after (the
    # count of acknowledged bytes is looked at once a second).
    assert SEND_TIMEOUT <= waited < asked + SEND_TIMEOUT + 4
    for client in stalled:
        assert await rest_of_body(client) < len(BLOB)  # cut short, not ended as if whole
    probe = await connect()
    while await dropped(probe, "send_timeout") < CAP:  # the last may be cut a look later
        await asyncio.sleep(0.25)
    assert await dropped(probe, "send_timeout") == CAP
    assert await dropped(probe, "idle") == 0
    assert (await probe.get("/healthz"))[0] == 200


async def test_a_client_reading_slowly_is_never_cut(connect_impatient: Connect) -> None:
    connect = connect_impatient
    cacher = await connect()
    assert await cacher.get(SLOW_PATH) == (200, SLOW_BLOB)
    slow = await connect(rcvbuf=4096)
    status, headers = await slow.ask(SLOW_PATH)
    assert status == 200
    started = time.monotonic()

    # 16 KiB every 50 ms (at most 320 KiB/s): the mirror's socket, full at first, takes
    # seconds to turn writable again, each time longer than the send timeout.
    body = bytearray()
    while len(body) < len(SLOW_BLOB):
        chunk = await asyncio.wait_for(slow.reader.read(16 * 1024), HANG)
        assert chunk, f"cut after {len(body)} bytes, {time.monotonic() - started:.1f}s"
        body += chunk
        await asyncio.sleep(0.05)

    assert time.monotonic() - started > 3 * SEND_TIMEOUT
    assert body == SLOW_BLOB
    assert (await slow.get("/healthz"))[0] == 200  # the same connection, still open
    assert await dropped(slow, "send_timeout") == 0
