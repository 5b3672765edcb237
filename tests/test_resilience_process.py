"""Resilience of a real mirror process: SIGKILL and SIGTERM, Redis going away, a full or
read-only cache directory, and a restart while the upstream is down.

    client (aiohttp) -> mirror process (+ redis-server) -> fake hub process -> distribution

The distribution registry and its content are shared by the module; every test gets its
own fake hub (its knobs and its life are the test's), its own mirror and cache directory.
The tests that mount a tmpfs or a read-only bind mount need root and skip without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.images import busybox_image, push_image
from tests.resilience_helpers import (
    MANIFEST_ACCEPT,
    MIB,
    MountError,
    Puller,
    RandomImage,
    cached_blob_path,
    connect_refused,
    count_lines,
    fill_filesystem,
    log_since_last_start,
    metric_value,
    read_only,
    seed_random_image,
    sha256_digest,
    tail,
    tmpfs,
    wait_for_file,
    write_config,
)
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess, RedisServer

# The log line the mirror writes when the cache directory stops taking writes.
UNWRITABLE_LOG = "takes no writes"
BIG_SIZE = 16 * MIB  # twice the tmpfs below, several seconds at the slowed CDN rate
TMPFS_SIZE = "8m"


def _require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make system-deps installs them)")


# --- fixtures ----------------------------------------------------------------------------


class Content:
    """What the module's registry holds."""

    def __init__(self, registry: DistributionRegistry) -> None:
        image = busybox_image()
        push_image(registry.url, "library/busybox", "latest", image)
        self.busybox_repo = "library/busybox"
        self.busybox_digest = image.manifest.digest
        self.busybox_blobs = [blob.digest for blob in image.blobs]
        self.big = seed_random_image(registry.url, "big", BIG_SIZE, seed=41)
        self.small = seed_random_image(registry.url, "small", 3 * MIB, seed=42)
        self.other = seed_random_image(registry.url, "other", 1 * MIB, seed=43)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    _require("docker-registry")
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def content(registry: DistributionRegistry) -> Content:
    return Content(registry)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, content: Content
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    _require("redis-server")
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A generous total timeout: a hang shows as a failure, not as a stuck test run.
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
        yield session


MirrorFactory = Callable[..., MirrorProcess]


@pytest.fixture
def make_mirror(tmp_path: Path, stack: ExitStack) -> MirrorFactory:
    """Write a config file and build (not start) a mirror process in tmp_path/mirror."""

    def make(
        upstream: str, config: dict[str, Any] | None = None, redis_url: str | None = None
    ) -> MirrorProcess:
        workdir = tmp_path / "mirror"
        path = write_config(tmp_path / "mirror.yml", config or {})
        mirror = MirrorProcess(workdir, upstream, redis_url, extra_args=["--config", str(path)])
        stack.callback(mirror.stop)
        return mirror

    return make


def storage_of(mirror: MirrorProcess) -> Path:
    return mirror.workdir / "data"


def mirror_log(mirror: MirrorProcess) -> str:
    return log_since_last_start(mirror.log_path)


async def set_knobs(session: aiohttp.ClientSession, hub: FakeHubProcess, **knobs: Any) -> None:
    async with session.post(f"{hub.registry_url}/_knobs", json=knobs) as resp:
        assert resp.status == 200, await resp.text()


async def metrics(session: aiohttp.ClientSession, mirror: MirrorProcess) -> str:
    # The session does not decompress (blobs must arrive as stored): ask for identity.
    headers = {"Accept-Encoding": "identity"}
    async with session.get(f"{mirror.url}/metrics", headers=headers) as resp:
        assert resp.status == 200
        return await resp.text()


async def metric(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str) -> float | None:
    return metric_value(await metrics(session, mirror), name)


BlobAnswer = tuple[int, bytes | None, str]  # status, body, error


async def get_blob(
    session: aiohttp.ClientSession, mirror: MirrorProcess, image: RandomImage
) -> BlobAnswer:
    """(status, body, error): body None and error set when the transfer broke."""
    try:
        async with session.get(mirror.url + image.blob_path) as resp:
            return resp.status, await resp.read(), ""
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, None, f"{type(exc).__name__}: {exc}"


def describe_blob_answer(answer: BlobAnswer, image: RandomImage) -> str:
    status, body, error = answer
    if error:
        return f"broken transfer ({error})"
    assert body is not None
    verdict = "right bytes" if body == image.data else f"WRONG bytes ({sha256_digest(body)})"
    return f"HTTP {status}, {len(body)} bytes, {verdict}"


async def read_at_least(resp: aiohttp.ClientResponse, n: int) -> bytearray:
    got = bytearray()
    while len(got) < n:
        chunk = await resp.content.read(64 * 1024)
        assert chunk, f"the body ended after {len(got)} bytes"
        got += chunk
    return got


# --- 1. SIGKILL mid-download ---------------------------------------------------------------


async def test_sigkill_mid_download_leaves_no_blob_and_restart_cleans_tmp(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
) -> None:
    mirror = make_mirror(hub.registry_url, {"upstream": {"read_timeout": "10s"}})
    mirror.start()
    storage, big = storage_of(mirror), content.big
    # 256 CDN chunks of 64 KiB at 20 ms each: ~5 s for the whole blob.
    await set_knobs(session, hub, cdn_delay=0.02)

    async with session.get(mirror.url + big.blob_path) as resp:
        assert resp.status == 200
        assert resp.content_length == len(big.data)
        got = await read_at_least(resp, 2 * MIB)
        assert got == big.data[: len(got)]
        os.kill(mirror.pid, signal.SIGKILL)
        assert mirror.proc is not None
        await asyncio.to_thread(mirror.proc.wait, 10)
        # The client must see a broken transfer, never a complete-looking body.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    final = cached_blob_path(storage, big.layer_digest)
    assert not final.exists(), "a partial blob is visible under its digest after SIGKILL"
    left = sorted(p.name for p in (storage / "tmp").iterdir())
    print(f"tmp/ after SIGKILL: {left}")  # a partial file is expected, not required

    mirror.stop()
    await set_knobs(session, hub, cdn_delay=0)
    mirror.start()
    assert list((storage / "tmp").iterdir()) == [], "tmp/ leftovers not cleaned at start"
    assert not final.exists()

    status, body, error = await get_blob(session, mirror, big)
    assert (status, error) == (200, "")
    assert body == big.data
    # The client has its last byte once the hash matched; the fsync and rename follow.
    assert await wait_for_file(final)
    assert final.read_bytes() == big.data
    assert list((storage / "tmp").iterdir()) == []


# --- 2. SIGTERM drains ------------------------------------------------------------------


async def test_sigterm_stops_accepting_finishes_in_flight_and_exits_zero(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
) -> None:
    shutdown_timeout = 20.0
    mirror = make_mirror(hub.registry_url, {"shutdown_timeout": f"{shutdown_timeout:g}s"})
    mirror.start()
    port, proc, big = mirror.port, mirror.proc, content.big
    assert proc is not None
    # ~4 s for the whole blob: the SIGTERM lands well inside the transfer.
    await set_knobs(session, hub, cdn_delay=0.015)

    async def refused_within(seconds: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if await asyncio.to_thread(connect_refused, port):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        return None

    async with session.get(mirror.url + big.blob_path) as resp:
        assert resp.status == 200
        head = await read_at_least(resp, MIB)
        os.kill(proc.pid, signal.SIGTERM)
        sent_at = time.monotonic()
        refused = asyncio.create_task(refused_within(3.0))
        try:
            rest = await resp.read()
        except aiohttp.ClientError as exc:
            pytest.fail(
                f"the in-flight response broke after SIGTERM ({type(exc).__name__}: {exc}) "
                f"\nmirror log:\n{tail(mirror_log(mirror))}"
            )
        finally:
            refused_after = await refused
    body = bytes(head) + rest
    assert len(body) == len(big.data)
    assert body == big.data
    assert refused_after is not None, (
        "new connections were still accepted 3 s after SIGTERM"
        f"\nmirror log:\n{tail(mirror_log(mirror))}"
    )
    print(f"connect refused {refused_after:.2f} s after SIGTERM")

    returncode = await asyncio.to_thread(proc.wait, shutdown_timeout + 10)
    print(f"exited {time.monotonic() - sent_at:.2f} s after SIGTERM with status {returncode}")
    assert returncode == 0, f"mirror log:\n{tail(mirror_log(mirror))}"


# --- 3. Redis stopped and restarted ------------------------------------------------------


async def test_redis_outage_and_empty_return(
    hub: FakeHubProcess,
    content: Content,
    redis: RedisServer,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
) -> None:
    # A 1 s tag TTL sends every tag lookup past the mirror's in-process record to Redis.
    mirror = make_mirror(hub.registry_url, {"cache": {"tag_ttl": "1s"}}, redis.url)
    mirror.start()
    puller = Puller(session, mirror.url)
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    assert await metric(session, mirror, "mirror_metadata_up") == 1.0

    redis.stop()
    await asyncio.sleep(1.1)  # the tag record is past its TTL: Redis is asked
    slow: list[str] = []
    for repo in (content.busybox_repo, content.small.repo):  # cached tag, then uncached
        started = time.monotonic()
        ok = await puller.pull(repo, "latest")
        took = time.monotonic() - started
        assert ok, f"pull of {repo} with Redis down: {puller.errors}\n{tail(mirror_log(mirror))}"
        slow.append(f"{repo}: {took:.2f} s")
    print("pulls with Redis down:", ", ".join(slow))
    assert await metric(session, mirror, "mirror_metadata_up") == 0.0
    async with session.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 503
        assert json.loads(await resp.text())["metadata"].startswith("unreachable")
    log = mirror_log(mirror)
    assert count_lines(log, "metadata store unreachable") == 1, tail(log)

    redis.start()  # same port, empty
    started = time.monotonic()
    up = None
    # The fallback retries Redis with backoff (1 s, doubling, at most 30 s): a few
    # seconds here, 35 s only as the bound where a fallback that never retries fails.
    while time.monotonic() - started < 35:
        assert await puller.pull(content.other.repo, "latest"), puller.errors
        up = await metric(session, mirror, "mirror_metadata_up")
        if up == 1.0:
            break
        await asyncio.sleep(0.5)
    print(f"mirror_metadata_up back to {up} {time.monotonic() - started:.1f} s after restart")
    assert up == 1.0, f"metadata still down 35 s after Redis came back\n{tail(mirror_log(mirror))}"

    # Redis came back empty: the tag is not known there, so it is asked upstream again.
    await asyncio.sleep(1.1)
    hub.reset()
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    stats = hub.stats()
    assert stats["manifest_head"] + stats["manifest_get"] >= 1, stats
    assert puller.errors == []


async def test_many_concurrent_requests_do_not_mark_a_healthy_redis_down(
    hub: FakeHubProcess,
    content: Content,
    redis: RedisServer,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
) -> None:
    """A burst of clients (as at the soak's start) must not be taken for a Redis outage."""
    mirror = make_mirror(hub.registry_url, redis_url=redis.url)
    mirror.start()
    clients = 250
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as burst:

        async def head(repo: str) -> int:
            url = f"{mirror.url}/v2/{repo}/manifests/latest"
            async with burst.head(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                return resp.status

        repos = [content.busybox_repo, content.small.repo, content.other.repo, content.big.repo]
        statuses = await asyncio.gather(*(head(repos[i % len(repos)]) for i in range(clients)))
    log = mirror_log(mirror)
    up = await metric(session, mirror, "mirror_metadata_up")
    assert statuses == [200] * clients
    assert count_lines(log, "metadata store unreachable") == 0, (
        f"{clients} concurrent requests with Redis up:\n"
        + "\n".join(line for line in log.splitlines() if "mirror.metadata" in line)
    )
    assert up == 1.0


# --- 4. storage full --------------------------------------------------------------------


def mount_or_skip(cm: Any, stack: ExitStack) -> Path:
    try:
        path: Path = stack.enter_context(cm)
    except MountError as exc:
        pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {exc}")
    return path


def wrong_answers(answers: list[tuple[str, RandomImage, BlobAnswer]]) -> list[str]:
    """A line for each blob GET that did not get the whole blob, right."""
    return [
        f"{what}: {describe_blob_answer(answer, image)}"
        for what, image, answer in answers
        if answer[0] != 200 or answer[1] != image.data
    ]


def readyz_problems(readyz: tuple[int, str], when: str) -> list[str]:
    status, text = readyz
    if status != 503 or json.loads(text).get("storage") != "not writable":
        return [f"/readyz {when}: {status} {text.strip()}"]
    return []


async def unwritable_problems(
    session: aiohttp.ClientSession, mirror: MirrorProcess
) -> tuple[list[str], str]:
    """What the metric and the log must say of a cache that takes no writes (the log
    says it once, however many requests met it); and the log, for the report."""
    problems = []
    writable = await metric(session, mirror, "mirror_storage_writable")
    if writable != 0.0:
        problems.append(f"mirror_storage_writable is {writable}, not 0.0")
    log = mirror_log(mirror)
    if (logged := count_lines(log, UNWRITABLE_LOG)) != 1:
        problems.append(f"{UNWRITABLE_LOG!r} logged {logged} times, not once")
    return problems, log


async def test_blob_larger_than_free_space_streams_uncached(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
    stack: ExitStack,
) -> None:
    """An 8 MiB tmpfs as the cache, a 16 MiB blob: it cannot be cached, it must still be
    served whole, from the first request on; and the cache stays writable, for it is this
    one blob that does not fit (an upstream must not switch the cache off with one)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mirror = make_mirror(hub.registry_url)
    storage = mount_or_skip(tmpfs(storage_of(mirror), TMPFS_SIZE), stack)
    stack.callback(mirror.stop)  # stopped before the unmount (callbacks run in reverse)
    mirror.start()
    big = content.big

    what = f"GET #{{}} of the {BIG_SIZE // MIB} MiB blob"
    answers = [(what.format(i), big, await get_blob(session, mirror, big)) for i in (1, 2, 3)]
    problems = wrong_answers(answers)
    if (writable := await metric(session, mirror, "mirror_storage_writable")) != 1.0:
        problems.append(f"mirror_storage_writable is {writable}, not 1.0")
    log = mirror_log(mirror)
    if count_lines(log, UNWRITABLE_LOG):
        problems.append(f"{UNWRITABLE_LOG!r} logged for one blob that does not fit")
    if cached_blob_path(storage, big.layer_digest).exists():
        problems.append("the blob is under its digest in a cache it does not fit in")
    if leftovers := list((storage / "tmp").iterdir()):
        problems.append(f"tmp/ holds {leftovers}")
    assert not problems, "\n".join(problems) + f"\nmirror log:\n{tail(log)}"


async def test_full_storage_streams_uncached_and_readyz_says_so(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
    stack: ExitStack,
) -> None:
    """The cache's filesystem is full to the last byte: every blob streams from upstream,
    /readyz and the metric say storage is not writable, the log says it once."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mirror = make_mirror(hub.registry_url)
    storage = mount_or_skip(tmpfs(storage_of(mirror), TMPFS_SIZE), stack)
    stack.callback(mirror.stop)
    mirror.start()
    fill_filesystem(storage / "filler")

    async with session.get(f"{mirror.url}/readyz") as resp:
        readyz = (resp.status, await resp.text())
    small, big = content.small, content.big
    answers = [
        (f"GET #{i} ({image.repo} blob)", image, await get_blob(session, mirror, image))
        for i, image in enumerate((small, big, small, big), 1)
    ]
    puller = Puller(session, mirror.url)
    await puller.pull(content.busybox_repo, "latest")
    async with session.get(f"{mirror.url}/readyz") as resp:
        readyz_after = (resp.status, await resp.text())

    problems, log = await unwritable_problems(session, mirror)
    problems += wrong_answers(answers)
    problems += [f"docker-like pull of busybox: {error}" for error in puller.errors]
    problems += readyz_problems(readyz, "before the requests")
    problems += readyz_problems(readyz_after, "after the requests")
    for image in (small, big):
        if cached_blob_path(storage, image.layer_digest).exists():
            problems.append(f"{image.repo}'s blob is cached on a full filesystem")
    assert not problems, "\n".join(problems) + f"\nmirror log:\n{tail(log)}"


# --- 5. read-only storage ---------------------------------------------------------------


async def test_read_only_storage_serves_cache_and_streams_the_rest(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
    stack: ExitStack,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mirror = make_mirror(hub.registry_url)
    mirror.start()
    storage, big = storage_of(mirror), content.big
    puller = Puller(session, mirror.url)
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    for digest in content.busybox_blobs:
        assert await wait_for_file(cached_blob_path(storage, digest))

    mount_or_skip(read_only(storage), stack)
    stack.callback(mirror.stop)  # before the unmount
    hub.reset()
    # The cached image, by tag and by digest, from the read-only cache alone.
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    cdn = hub.stats()["cdn_get_by_digest"]
    assert not set(cdn) & set(content.busybox_blobs), f"cached blobs fetched again: {cdn}"

    answers = [
        (f"GET #{i} of the uncached blob", big, await get_blob(session, mirror, big))
        for i in (1, 2)
    ]
    async with session.get(f"{mirror.url}/readyz") as resp:
        readyz = (resp.status, await resp.text())
    problems, log = await unwritable_problems(session, mirror)
    problems += wrong_answers(answers)
    problems += readyz_problems(readyz, "after the requests")
    assert not problems, "\n".join(problems) + f"\nmirror log:\n{tail(log)}"


async def test_workers_started_on_a_read_only_cache_serve_it_and_stream_the_rest(
    hub: FakeHubProcess,
    content: Content,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
    stack: ExitStack,
) -> None:
    """Two workers started again on a cache that went read-only (ext4's errors=remount-ro):
    they serve what it holds and stream the rest, as one process does (before, each worker
    died counting the directory for eviction, and the supervisor gave up on the host after
    five restarts)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mirror = make_mirror(hub.registry_url, {"workers": 2})
    mirror.start()
    storage = storage_of(mirror)
    puller = Puller(session, mirror.url)
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    for digest in content.busybox_blobs:
        assert await wait_for_file(cached_blob_path(storage, digest))
    mirror.stop()

    mount_or_skip(read_only(storage), stack)
    mirror.start()
    stack.callback(mirror.stop)  # before the unmount
    hub.reset()
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    cdn = hub.stats()["cdn_get_by_digest"]
    assert not set(cdn) & set(content.busybox_blobs), f"cached blobs fetched again: {cdn}"
    answers = [
        (
            f"GET #{i} of the uncached blob",
            content.small,
            await get_blob(session, mirror, content.small),
        )
        for i in (1, 2)
    ]
    await asyncio.sleep(2)  # a worker dying at its start would be seen restarted by now
    problems = wrong_answers(answers)
    log = mirror_log(mirror)
    if "Traceback" in log or "died" in log:
        problems.append("a worker died")
    if mirror.proc is None or mirror.proc.poll() is not None:
        problems.append("the supervisor exited")
    assert not problems, "\n".join(problems) + f"\nmirror log:\n{tail(log)}"


# --- 6. start with the upstream down -----------------------------------------------------


async def test_restart_with_upstream_down_serves_cache_stale(
    hub: FakeHubProcess,
    content: Content,
    redis: RedisServer,
    make_mirror: MirrorFactory,
    session: aiohttp.ClientSession,
) -> None:
    config = {
        "cache": {"tag_ttl": "1s", "stale_if_error": "1h"},
        "upstream": {"connect_timeout": "2s", "read_timeout": "5s"},
    }
    mirror = make_mirror(hub.registry_url, config, redis.url)
    mirror.start()
    puller = Puller(session, mirror.url)
    assert await puller.pull(content.busybox_repo, "latest"), puller.errors
    cached_at = time.monotonic()

    hub.stop()
    mirror.stop()
    mirror.start()
    await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - cached_at)))  # past the TTL

    repo, tag = content.busybox_repo, "latest"
    accept = {"Accept": MANIFEST_ACCEPT}
    async with session.head(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers=accept) as resp:
        head = (resp.status, resp.headers.get("Docker-Content-Digest"), resp.headers.get("Warning"))
    async with session.get(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers=accept) as resp:
        body = await resp.read()
        get = (resp.status, resp.headers.get("Docker-Content-Digest"), resp.headers.get("Warning"))
    log = mirror_log(mirror)
    assert head[0] == 200, f"HEAD {repo}:{tag} with upstream down: {head}\n{tail(log)}"
    assert get[0] == 200, f"GET {repo}:{tag} with upstream down: {get} {body[:300]!r}\n{tail(log)}"
    for answer in (head, get):
        assert answer[1] == content.busybox_digest
        assert answer[2] is not None and answer[2].startswith("110"), answer
    assert sha256_digest(body) == content.busybox_digest

    blobs = Puller(session, mirror.url)
    for digest in content.busybox_blobs:
        await blobs.request(
            "GET", f"/v2/{repo}/blobs/{digest}", expect_digest=digest, keep_body=False
        )
    assert blobs.errors == []
    # The whole docker-like pull works too (HEAD by tag, then everything by digest).
    assert await blobs.pull(repo, tag), blobs.errors

    for path in (
        f"/v2/{content.small.repo}/manifests/latest",  # an uncached tag
        content.small.blob_path,  # an uncached blob
    ):
        started = time.monotonic()
        async with session.get(f"{mirror.url}{path}", headers=accept) as resp:
            status, text = resp.status, await resp.text()
        took = time.monotonic() - started
        assert status in (503, 404), f"GET {path}: {status} {text[:300]}"
        assert json.loads(text)["errors"][0]["code"], text
        assert took < 3, f"GET {path} took {took:.1f} s to fail"
