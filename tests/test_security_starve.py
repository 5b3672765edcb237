"""No stranger can starve the mirror: password floods, guessers, slow and hoarded connections,
a stalled upstream and endless query variants each meet a bound, and /healthz still answers.

Each case first makes the attack as it would be made, then asserts the refusal, its counter,
and that nothing reached the cache, the upstream or the log.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from mirror.access import hashing
from mirror.access import throttle as throttle_module
from mirror.access.throttle import FailureThrottle, Throttled
from mirror.cache import taglists
from mirror.config import AuthConfig, ConfigError, UpstreamConfig, config_from_mapping
from mirror.web.access import client_auth_key
from mirror.web.keys import metadata_key, metrics_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.services import MirrorProcess

USER, PASSWORD = "alice", "wonderland-0f-passw0rds"
OTHER, OTHER_PASSWORD = "bob", "builder-0f-passw0rds"
WRONG = "not-her-password-at-all"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def subject_of(answer: dict[str, Any]) -> str:
    """The user a `/token` answer's token names ("" for anonymous)."""
    payload = answer["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


def sample(client: Any, name: str, **labels: str) -> float:
    value = client.app[metrics_key].registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def cached(data: Path) -> list[Path]:
    """Files in the cache (blobs and manifests)."""
    return [p for kind in ("blobs", "manifests") for p in (data / kind).rglob("*") if p.is_file()]


def assert_quiet(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """No warning or error was logged, and no secret in any line."""
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert secret not in text


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes bcrypt.checkpw is asked to check against, in order."""
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


async def auth_client(
    make_client: MakeClient,
    tmp_path: Path,
    cost: int = 4,
    anonymous: bool = False,
    **changes: Any,
) -> Any:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()}\n"
            for user, password in ((USER, PASSWORD), (OTHER, OTHER_PASSWORD))
        )
    )
    return await make_client(
        auth=AuthConfig(htpasswd=htpasswd, anonymous_pull=anonymous), **changes
    )


# --- logins ---------------------------------------------------------------------------------


async def test_a_login_flood_waits_on_its_own_pool_not_the_file_threads(
    make_client: MakeClient,
    tmp_path: Path,
    hub: FakeHub,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await auth_client(make_client, tmp_path, cost=10)  # ~60 ms a check
    auth = client.app[client_auth_key]
    auth.throttle = FailureThrottle(burst=10**6, address_burst=10**6)  # as if 200 addresses
    # Every check waits until the file read below is done: behind the queued checks, the
    # read would never be done; on its own threads it is, whatever the machine's load.
    held = threading.Event()
    checkpw = bcrypt.checkpw

    def held_check(password: bytes, hashed: bytes) -> bool:
        held.wait(60)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", held_check)

    flood = [
        asyncio.create_task(
            client.get("/v2/library/app/manifests/1", headers=basic(USER, f"{WRONG}{n}"))
        )
        for n in range(200)
    ]
    while not sample(client, "mirror_client_auth_busy_total"):  # its queue is full
        await asyncio.sleep(0.01)
    try:
        # What every cache file read waits for.
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 30)
        checked = sum(1 for task in flood if task.done() and task.result().status == 401)
    finally:
        held.set()
    answers = await asyncio.gather(*flood)

    assert checked == 0, checked
    statuses = sorted({resp.status for resp in answers})
    assert statuses == [401, 503]
    busy = [resp for resp in answers if resp.status == 503]
    assert len(busy) >= 200 - (hashing.WORKERS + hashing.QUEUE)
    assert {resp.headers["Retry-After"] for resp in busy} == {"1"}
    assert (await busy[0].json())["errors"][0]["code"] == "UNAVAILABLE"
    assert sample(client, "mirror_client_auth_busy_total") == len(busy)
    assert hub.stats["manifest_get"] == 0
    assert cached(tmp_path / "data") == []
    assert_quiet(caplog, WRONG)


async def test_one_address_sending_logins_at_once_leaves_other_addresses_room(
    make_client: MakeClient, tmp_path: Path
) -> None:
    proxy = (ipaddress.ip_network("127.0.0.1/32"),)  # so that a client may be elsewhere
    client = await auth_client(make_client, tmp_path, cost=10, trusted_proxies=proxy)
    await client.get("/v2/", headers=basic("user0", WRONG))  # the unknown names' decoy made

    # Six names, ten wrong passwords each, all at once: within the bounds of one address.
    flood = [
        asyncio.create_task(client.get("/v2/", headers=basic(f"user{n % 6}", f"{WRONG}{n}")))
        for n in range(59)
    ]
    while not sample(client, "mirror_client_auth_busy_total"):  # past its share
        await asyncio.sleep(0.01)
    elsewhere = {"X-Forwarded-For": "203.0.113.9", **basic(USER, PASSWORD)}
    alice = await client.get("/v2/", headers=elsewhere)
    answers = await asyncio.gather(*flood)

    assert alice.status == 200
    assert {resp.status for resp in answers} == {401, 503}


async def test_logins_right_after_start_find_the_users(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await auth_client(make_client, tmp_path)
    users = [USER, USER, "mallory"]  # at once, the first logins since the start
    answers = await asyncio.gather(*(client.get("/v2/", headers=basic(u, PASSWORD)) for u in users))
    assert [resp.status for resp in answers] == [200, 200, 401]


async def test_the_same_login_sent_many_times_at_once_is_checked_once(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    # A deployment's pods starting on one node, each fetching a token with the same login,
    # the first right after the mirror started; then a CI fleet with a stale password.
    client = await auth_client(make_client, tmp_path, cost=10)  # ~60 ms a check

    right = await asyncio.gather(
        *(client.get("/token", headers=basic(USER, PASSWORD)) for _ in range(40))
    )
    checks = len(bcrypt_calls)
    wrong = await asyncio.gather(
        *(client.get("/token", headers=basic(USER, WRONG)) for _ in range(40))
    )

    assert [resp.status for resp in right] == [200] * 40
    assert checks == 1
    assert [resp.status for resp in wrong] == [401] * 40
    assert len(bcrypt_calls) == 2


async def test_wrong_passwords_from_one_address_are_throttled(
    make_client: MakeClient,
    tmp_path: Path,
    hub: FakeHub,
    bcrypt_calls: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await auth_client(make_client, tmp_path)

    answers = [
        await client.get("/v2/library/app/manifests/1", headers=basic(USER, f"{WRONG}{n}"))
        for n in range(25)
    ]
    token = await client.get("/token", headers=basic(USER, WRONG))

    assert [resp.status for resp in answers] == [401] * 10 + [429] * 15
    assert token.status == 429
    assert 1 <= int(token.headers["Retry-After"]) <= 60
    assert (await token.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(bcrypt_calls) == 10  # refused ones cost no password check
    assert sample(client, "mirror_client_auth_throttled_total") == 16
    assert hub.stats["manifest_get"] == 0
    assert_quiet(caplog, WRONG)


async def test_a_known_login_is_not_slowed_and_passes_a_throttled_address(
    make_client: MakeClient, tmp_path: Path, hub: FakeHub, bcrypt_calls: list[bytes]
) -> None:
    hub.content.add_image("library/app", "1", [b"layer"])
    client = await auth_client(make_client, tmp_path)
    for _ in range(30):  # successes count for nothing
        assert (await client.get("/v2/", headers=basic(USER, PASSWORD))).status == 200
    assert len(bcrypt_calls) == 1  # then remembered

    for _ in range(12):  # someone at the same address guesses
        await client.get("/v2/", headers=basic(USER, WRONG))
    refused = await client.get("/token", headers=basic(USER, WRONG))
    pulled = await client.get("/v2/library/app/manifests/1", headers=basic(USER, PASSWORD))

    assert refused.status == 429
    assert pulled.status == 200


async def test_with_anonymous_pulls_a_throttled_login_pulls_anonymously(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    # Docker sends a user's Docker Hub login to the mirror's realm: wrong here, every time.
    client = await auth_client(make_client, tmp_path, anonymous=True)
    answers = [await client.get("/token", headers=basic("hubuser", WRONG)) for _ in range(20)]

    assert [resp.status for resp in answers] == [200] * 20
    assert {subject_of(await resp.json()) for resp in answers} == {""}
    assert len(bcrypt_calls) == 10
    assert sample(client, "mirror_client_auth_refused_total", reason="password") == 20


@pytest.mark.parametrize("anonymous", [False, True])
async def test_one_users_failures_lock_out_no_other_user_at_the_address(
    make_client: MakeClient, tmp_path: Path, anonymous: bool
) -> None:
    # Behind one NAT: a CI job holding bob's old password, then alice logs in.
    client = await auth_client(make_client, tmp_path, anonymous=anonymous)
    stale = [await client.get("/token", headers=basic(OTHER, WRONG)) for _ in range(11)]
    alice = await client.get("/token", headers=basic(USER, PASSWORD))

    assert [resp.status for resp in stale] == [200 if anonymous else 401] * 10 + [429]
    assert alice.status == 200
    assert subject_of(await alice.json()) == USER


async def test_a_throttled_user_is_told_to_wait_where_anonymous_clients_may_pull(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    client = await auth_client(make_client, tmp_path, anonymous=True)
    wrong = [await client.get("/token", headers=basic(USER, WRONG)) for _ in range(10)]
    token = await client.get("/token", headers=basic(USER, PASSWORD))
    pull = await client.get("/v2/library/app/manifests/1", headers=basic(USER, PASSWORD))

    # Each wrong one pulls anonymously (it may be a Docker Hub login); the right one,
    # unchecked, is told to wait rather than quietly made anonymous.
    assert [resp.status for resp in wrong] == [200] * 10
    for refused in (token, pull):
        assert refused.status == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 6
        assert (await refused.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(bcrypt_calls) == 10
    assert sample(client, "mirror_client_auth_refused_total", reason="password") == 10
    assert sample(client, "mirror_client_auth_throttled_total") == 2


async def test_an_address_trying_name_after_name_is_refused_whatever_the_name(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    client = await auth_client(make_client, tmp_path, anonymous=True)
    names = [f"user{n}" for n in range(throttle_module.ADDRESS_BURST)]
    tried = [await client.get("/token", headers=basic(name, WRONG)) for name in names]
    stranger = await client.get("/token", headers=basic("hubuser", WRONG))
    alice = await client.get("/token", headers=basic(USER, PASSWORD))

    assert {resp.status for resp in tried} == {200}
    # A stranger's name answered as a user's is: telling them apart would tell for free
    # which names exist.
    assert (stranger.status, alice.status) == (429, 429)
    assert len(bcrypt_calls) == throttle_module.ADDRESS_BURST


async def test_wrong_passwords_at_once_are_held_to_the_burst(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    client = await auth_client(make_client, tmp_path, cost=10)  # ~60 ms a check
    answers = await asyncio.gather(
        *(client.get("/v2/", headers=basic(USER, f"{WRONG}{n}")) for n in range(30))
    )

    assert sorted(resp.status for resp in answers) == [401] * 10 + [429] * 20
    assert len(bcrypt_calls) == 10


async def test_an_unknown_user_costs_a_wrong_password(
    make_client: MakeClient, tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    client = await auth_client(make_client, tmp_path, cost=5)
    for user in ("alice", "admin", "root"):  # which names exist? ask, and time the answers
        assert (await client.get("/v2/", headers=basic(user, WRONG))).status == 401

    assert len(bcrypt_calls) == 3  # unknown names are checked too
    assert {hashed[:7] for hashed in bcrypt_calls} == {b"$2b$05$"}  # at the file's cost
    assert not bcrypt.checkpw(WRONG.encode(), bcrypt_calls[1])


def test_the_throttle_table_is_bounded_and_an_ipv6_64_is_one_address() -> None:
    now = [0.0]
    throttle = FailureThrottle(burst=3, rate=1.0, addresses=100, pairs=100, clock=lambda: now[0])
    for n in range(10_000):  # a botnet, each address failing once
        assert throttle.reserve(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", USER) is None
    assert len(throttle) == 100

    for n in range(3):  # one host walking through its /64
        assert throttle.reserve(f"2001:db8:1:2::{n + 1}", USER) is None
    assert throttle.check("2001:db8:1:2::ffff", USER) == Throttled(1, user=True)
    assert throttle.check("2001:db8:1:3::1", USER) is None
    now[0] = 1.0
    assert throttle.check("2001:db8:1:2::1", USER) is None


def test_an_address_trying_name_after_name_meets_its_own_bound() -> None:
    now = [0.0]
    throttle = FailureThrottle(clock=lambda: now[0])
    for n in range(throttle_module.ADDRESS_BURST):  # one try at each name, at once
        assert throttle.reserve("192.0.2.7", f"user{n}") is None
    assert throttle.check("192.0.2.7", "another") == Throttled(1, user=False)
    assert throttle.check("192.0.2.8", "another") is None
    now[0] = 1 / throttle_module.ADDRESS_RATE
    assert throttle.reserve("192.0.2.7", "another") is None
    throttle.release("192.0.2.7", "another")  # it was right: it counts for nothing
    assert throttle.check("192.0.2.7", "another2") is None


# --- connections ----------------------------------------------------------------------------


@pytest.fixture
def no_upstream() -> Iterator[socket.socket]:
    """A listening socket as the upstream: any connection to it is seen, none is answered."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        yield sock


def reached(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def start_mirror(tmp_path: Path, upstream: socket.socket, server: dict[str, Any]) -> MirrorProcess:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": server}))
    port = upstream.getsockname()[1]
    return MirrorProcess(tmp_path, f"http://127.0.0.1:{port}", extra_args=["--config", str(config)])


def metric(mirror: MirrorProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no {name}{labels}")


async def slowloris(port: int, lifetimes: list[float], connected: asyncio.Event) -> None:
    """A client that opens a request and sends one more header byte each second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    lifetimes.append(-1.0)
    index = len(lifetimes) - 1
    connected.set()
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Slow: ")
    try:
        while not reader.at_eof():
            writer.write(b"a")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(100), 1.0)
            except TimeoutError:
                continue
    except OSError:
        pass
    finally:
        lifetimes[index] = time.monotonic() - opened
        writer.close()


async def flood(port: int, count: int) -> tuple[list[asyncio.Task[None]], list[float]]:
    lifetimes: list[float] = []
    connected = asyncio.Event()
    tasks = [asyncio.create_task(slowloris(port, lifetimes, connected)) for _ in range(count)]
    while len(lifetimes) < count:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # every one has sent its first bytes
    return tasks, lifetimes


async def healthz_time(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200
        return time.monotonic() - started


def assert_log_quiet(mirror: MirrorProcess) -> None:
    text = mirror.log_path.read_text()
    assert "Traceback" not in text
    assert "Error" not in text
    assert len(text.splitlines()) < 20  # no line per connection


async def test_slowloris_is_cut_off_at_the_header_timeout(
    tmp_path: Path, no_upstream: socket.socket
) -> None:
    with start_mirror(tmp_path, no_upstream, {"header_timeout": "2s"}) as mirror:
        tasks, lifetimes = await flood(mirror.port, 500)
        assert await healthz_time(mirror.url) < 1.0
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

        assert max(lifetimes) < 2.0 + 1.0
        assert metric(mirror, "mirror_connections_dropped_total", reason="header_timeout") == 500
        assert not reached(no_upstream)
        assert cached(tmp_path / "data") == []
        assert_log_quiet(mirror)


async def test_slowloris_past_the_cap_makes_room_for_healthz(
    tmp_path: Path, no_upstream: socket.socket
) -> None:
    limits = {"header_timeout": "5s", "max_connections": 50}
    with start_mirror(tmp_path, no_upstream, limits) as mirror:
        tasks, lifetimes = await flood(mirror.port, 500)
        assert await healthz_time(mirror.url) < 1.0
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

        assert max(lifetimes) < 5.0 + 1.0
        assert metric(mirror, "mirror_connections_dropped_total", reason="evicted") >= 450
        assert metric(mirror, "mirror_connections_refused_total") == 0
        assert not reached(no_upstream)
        assert_log_quiet(mirror)


async def test_hoarded_connections_make_room_and_end_by_timeouts(
    tmp_path: Path, no_upstream: socket.socket
) -> None:
    limits = {"header_timeout": "1s", "keepalive_timeout": "2s", "max_connections": 5}
    with start_mirror(tmp_path, no_upstream, limits) as mirror:
        # Five connections each ask once, then hold on (kept alive, sending nothing).
        held = [await asyncio.open_connection("127.0.0.1", mirror.port) for _ in range(5)]
        for reader, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # A sixth gets in: the one idle longest is closed to make room.
        reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n\r\n")
        answer = await reader.readuntil(b"\r\n\r\n")
        await held[0][0].read()
        # One asks once, then starts its next request and never finishes it.
        opened = time.monotonic()
        held[1][1].write(b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n")
        await held[1][0].read()
        sloth = time.monotonic() - opened
        # The rest are closed once idle for keepalive_timeout.
        rest = [*held[2:], (reader, writer)]
        await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in rest)), 4)
        for _, w in [*held, (reader, writer)]:
            w.close()

        assert answer.startswith(b"HTTP/1.1 200")
        assert sloth < 1.0 + 0.5
        assert metric(mirror, "mirror_connections_dropped_total", reason="idle") == 1
        assert metric(mirror, "mirror_connections_refused_total") == 0
        assert await healthz_time(mirror.url) < 1.0
        assert not reached(no_upstream)


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"header_timeout": 0}, "server.header_timeout"),
        ({"keepalive_timeout": "soon"}, "server.keepalive_timeout"),
        ({"send_timeout": 0}, "server.send_timeout"),
        ({"send_timeout": "-5s"}, "server.send_timeout"),
        ({"max_connections": 0}, "server.max_connections"),
        ({"max_connections": "many"}, "server.max_connections"),
        ({"max_connections": True}, "server.max_connections"),
        ({"backlog": 10}, "server.backlog"),
    ],
)
def test_bad_server_limits_stop_the_mirror_at_load(server: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"server": server})
    assert caught.value.key == key


def test_server_limits_have_defaults() -> None:
    limits = config_from_mapping({}).server
    assert (
        limits.header_timeout,
        limits.keepalive_timeout,
        limits.send_timeout,
        limits.max_connections,
    ) == (10.0, 75.0, 60.0, 4096)


# --- upstream pools -------------------------------------------------------------------------


@pytest.fixture
async def stalled_upstream() -> AsyncIterator[tuple[str, asyncio.Event, list[str]]]:
    """An upstream that takes every request and never answers (until released)."""
    release, seen = asyncio.Event(), []

    async def stall(request: web.Request) -> web.Response:
        seen.append(request.path)
        await release.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stall)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), release, seen
    release.set()
    await server.close()


async def test_a_stalled_upstream_delays_no_other(
    hub: FakeHub,
    make_client: MakeClient,
    stalled_upstream: tuple[str, asyncio.Event, list[str]],
) -> None:
    url, release, seen = stalled_upstream
    hub.content.add_image("library/app", "1", [b"layer"])
    stalled = UpstreamConfig(url=url, name="stalled.test", connect_timeout=5, read_timeout=60)
    client = await make_client(upstreams=(stalled,))
    base = str(client.make_url("")).rstrip("/")

    # Many pulls from the stalled upstream at once, more than any one pool holds.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        held = [
            asyncio.create_task(session.get(f"{base}/v2/stalled.test/r{n}/manifests/1"))
            for n in range(300)
        ]
        while len(seen) < 256:  # its pool is exhausted
            await asyncio.sleep(0.05)
        started = time.monotonic()
        resp = await client.get("/v2/library/app/manifests/1")
        took = time.monotonic() - started
        release.set()
        for task in held:
            (await task).release()

    assert resp.status == 200
    assert took < 2.0


# --- tag lists ------------------------------------------------------------------------------


async def test_a_thousand_query_variants_keep_one_record(
    hub: FakeHub, make_client: MakeClient
) -> None:
    for tag in ("a", "b", "c"):
        hub.content.add_image("library/app", tag, [f"layer {tag}".encode()])
    client = await make_client()

    for n in range(1000):  # every variant a cache keyed on the query would keep apart
        resp = await client.get(f"/v2/library/app/tags/list?n={n % 7}&last={n}&x{n}={n}")
        assert resp.status == 200

    records = [(repo, tag) for _, repo, tag, _ in await client.app[metadata_key].tags()]
    assert records == [("library/app", taglists.KEPT_KEY)]
    assert hub.stats["tags_list"] == 1
