"""One contract for both metadata stores: in-process and a real Redis (one server, Sentinel,
Cluster)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from mirror.config import RedisConfig
from mirror.metadata import redis as redis_metadata
from mirror.metadata.fallback import FallbackMetadata, open_metadata
from mirror.metadata.memory import MemoryMetadata
from mirror.metadata.redis import RedisMetadata
from mirror.metadata.store import MetadataStore, TagRecord
from mirror.metadata.topology import DOWN_ERRORS
from tests.redis_topologies import (
    TOPOLOGIES,
    RedisClusterSetup,
    flushed_redis_url,
    info_field,
    require_redis_tools,
    wait_until,
)
from tests.services import RedisServer

TTL = 600
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def record(digest: str = DIGEST_A, size: int = 527) -> TagRecord:
    return TagRecord(digest, DOCKER_MANIFEST, size, time.time())


@pytest.fixture(params=["memory", "sqlite", *TOPOLOGIES])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def metadata_config(request: pytest.FixtureRequest, backend: str) -> RedisConfig:
    """In-process (alone, or the workers' SQLite file), and Redis as one server, with
    Sentinel and as a Cluster (flushed)."""
    if backend in ("memory", "sqlite"):
        return RedisConfig(url=None)
    return RedisConfig(url=flushed_redis_url(request, backend))


@pytest.fixture
async def store(
    metadata_config: RedisConfig, backend: str, tmp_path: Path
) -> AsyncIterator[MetadataStore]:
    shared = tmp_path / "metadata.sqlite" if backend == "sqlite" else None
    metadata = open_metadata(metadata_config.url, ttl=TTL, shared=shared)
    yield metadata
    await metadata.close()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test Redis, flushed, to look at the keys the store writes."""
    conn = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await conn.flushdb()
    yield conn
    await conn.aclose()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[MetadataStore]:
    metadata = open_metadata(redis_server.url, ttl=TTL)
    yield metadata
    await metadata.close()


async def test_tag_record_round_trips(store: MetadataStore) -> None:
    rec = record()
    await store.put_tag("registry-1.docker.io", "library/nginx", "latest", rec)
    assert await store.get_tag("registry-1.docker.io", "library/nginx", "latest") == rec


async def test_put_replaces_previous_record(store: MetadataStore) -> None:
    await store.put_tag("hub", "library/nginx", "latest", record(DIGEST_A))
    newer = record(DIGEST_B, size=99)
    await store.put_tag("hub", "library/nginx", "latest", newer)
    assert await store.get_tag("hub", "library/nginx", "latest") == newer


async def test_missing_tag_is_none(store: MetadataStore) -> None:
    assert await store.get_tag("hub", "library/nginx", "latest") is None
    await store.put_tag("hub", "library/nginx", "latest", record())
    assert await store.get_tag("hub", "library/nginx", "1.27") is None
    assert await store.get_tag("hub", "library/redis", "latest") is None


async def test_a_read_moves_a_bucket_record_on_and_never_makes_one(
    store: MetadataStore,
) -> None:
    """Another process's eviction drops the record: a later read must not bring it back."""
    await store.put_blob_read(DIGEST_A, 527, 100.0)
    assert await store.touch_blob_read(DIGEST_A, 200.5) == 527
    assert await store.get_blob_read(DIGEST_A) == (527, 200.5)
    await store.forget_blob(DIGEST_A)
    assert await store.touch_blob_read(DIGEST_A, 300.0) is None
    assert await store.touch_blob_read(DIGEST_B, 300.0) is None
    assert await store.get_blob_read(DIGEST_A) is None
    assert await store.blob_reads() == {}


async def test_records_are_per_upstream(store: MetadataStore) -> None:
    hub, ghcr = record(DIGEST_A), record(DIGEST_B)
    await store.put_tag("registry-1.docker.io", "library/nginx", "latest", hub)
    assert await store.get_tag("ghcr.io", "library/nginx", "latest") is None
    await store.put_tag("ghcr.io", "library/nginx", "latest", ghcr)
    assert await store.get_tag("registry-1.docker.io", "library/nginx", "latest") == hub
    assert await store.get_tag("ghcr.io", "library/nginx", "latest") == ghcr


async def test_repositories_empty(store: MetadataStore) -> None:
    assert await store.repositories(100, None) == []


async def test_repositories_lexical_and_deduplicated(store: MetadataStore) -> None:
    for repo in ["library/redis", "bitnami/redis", "library/nginx", "library/redis", "a"]:
        await store.add_repository(repo)
    await store.add_repository("bitnami/redis")
    assert await store.repositories(100, None) == [
        "a",
        "bitnami/redis",
        "library/nginx",
        "library/redis",
    ]


async def test_repositories_paginate_with_last(store: MetadataStore) -> None:
    names = [f"repo{i:02d}" for i in range(7)]
    for repo in reversed(names):
        await store.add_repository(repo)
    assert await store.repositories(3, None) == names[:3]
    assert await store.repositories(3, "repo02") == names[3:6]
    assert await store.repositories(3, "repo05") == names[6:]
    assert await store.repositories(3, "repo06") == []


async def test_repositories_last_need_not_exist(store: MetadataStore) -> None:
    for repo in ["alpine", "nginx", "redis"]:
        await store.add_repository(repo)
    assert await store.repositories(10, "m") == ["nginx", "redis"]
    assert await store.repositories(0, None) == []


async def test_ping_answers(store: MetadataStore) -> None:
    assert await store.ping() is None


async def test_redis_tag_key_is_prefixed_and_expires(
    raw_redis: aioredis.Redis, redis_store: MetadataStore
) -> None:
    await redis_store.put_tag("registry-1.docker.io", "library/nginx", "latest", record())
    keys = await raw_redis.keys("*")
    assert keys == ["mirror:tag:registry-1.docker.io:library/nginx:latest"]
    ttl = await raw_redis.ttl(keys[0])
    assert ttl > TTL  # kept beyond the tag TTL, to serve stale through an outage
    assert ttl <= TTL + 7 * 86400  # but not forever


async def test_redis_keeps_records_a_second_with_no_ttl_and_no_stale_window(
    raw_redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """`tag_ttl: 0` and `stale_if_error: 0` (always revalidate) still write to Redis: an
    expiry of 0 is refused there, and the store fell back to the process's memory."""
    changes: list[bool] = []
    store = open_metadata(redis_server.url, ttl=0, retention=0, on_change=changes.append)
    try:
        await store.put_tag("hub", "library/nginx", "latest", record())
        await store.add_holdings("hub", "library/nginx", [DIGEST_A], time.time())
        key = "mirror:tag:hub:library/nginx:latest"
        assert 0 < await raw_redis.ttl(key) <= 1
        assert await raw_redis.zrange("mirror:holds:hub:library/nginx", 0, -1) == [DIGEST_A]
        assert changes == []  # never taken for unreachable
    finally:
        await store.close()


async def test_redis_records_survive_a_new_store(
    raw_redis: aioredis.Redis, redis_store: MetadataStore, redis_server: RedisServer
) -> None:
    rec = record()
    await redis_store.put_tag("hub", "library/nginx", "latest", rec)
    await redis_store.add_repository("library/nginx")
    other = open_metadata(redis_server.url, ttl=TTL)  # another replica on the same Redis
    try:
        assert await other.get_tag("hub", "library/nginx", "latest") == rec
        assert await other.repositories(10, None) == ["library/nginx"]
    finally:
        await other.close()


async def test_redis_catalogue_key_is_prefixed(
    raw_redis: aioredis.Redis, redis_store: MetadataStore
) -> None:
    await redis_store.add_repository("library/nginx")
    keys = await raw_redis.keys("*")
    assert keys and all(key.startswith("mirror:") for key in keys)


async def test_tags_listed_from_every_cluster_master(
    redis_cluster: RedisClusterSetup,
) -> None:
    """Tag keys spread over the masters by hash slot; listing them scans every master."""
    redis_cluster.flush()
    store = open_metadata(redis_cluster.url, ttl=TTL)
    expected = {("hub", f"library/app{i}", "latest") for i in range(30)}
    try:
        for upstream, repo, tag in expected:
            await store.put_tag(upstream, repo, tag, record())
        await store.add_repository("library/app0")
        listed = {(upstream, repo, tag) for upstream, repo, tag, _ in await store.tags()}
        assert await store.repositories(10, None) == ["library/app0"]
    finally:
        await store.close()
    holding = [port for port, keys in redis_cluster.keys_per_node().items() if keys]
    assert len(holding) == 3, redis_cluster.keys_per_node()
    assert listed == expected


async def test_a_workers_sqlite_file_that_fails_is_stood_in_for_by_memory(
    tmp_path: Path,
) -> None:
    """The workers' SQLite file lives on the cache disk: it can fail to open, fill up or
    stay locked. Each call it cannot answer is answered from memory (a request never fails
    on it), /readyz hears of it through ping, and the file is used again once it answers."""
    shared = tmp_path / "metadata.sqlite"
    shared.mkdir()  # something else at its path: no connection opens
    changes: list[bool] = []
    metadata = open_metadata(None, ttl=TTL, shared=shared, on_change=changes.append)
    try:
        rec = record()
        await metadata.put_tag("docker.io", "library/alpine", "3", rec)
        assert await metadata.get_tag("docker.io", "library/alpine", "3") == rec
        await metadata.add_repository("library/alpine")
        assert await metadata.repositories(10, None) == ["library/alpine"]
        assert changes == [False]
        with pytest.raises(sqlite3.DatabaseError):
            await metadata.ping()
        shared.rmdir()  # a sound file again (made anew); /readyz's ping tries it at once
        assert await metadata.ping() is None
        assert changes == [False, True]
        await metadata.put_tag("docker.io", "library/alpine", "3", rec)
    finally:
        await metadata.close()
    again = open_metadata(None, ttl=TTL, shared=shared)
    try:  # the record written after the return is in the file
        assert await again.get_tag("docker.io", "library/alpine", "3") == rec
    finally:
        await again.close()


@pytest.mark.parametrize("damage", ["torn", "pages"])
async def test_a_damaged_workers_sqlite_file_is_set_aside_for_a_new_one(
    tmp_path: Path, damage: str
) -> None:
    """A SQLite file that is no database (overwritten) or whose pages are damaged (a disk
    fault under a sound header) is set aside, kept beside for a look, and a new one made:
    records are shared again and /readyz's ping answers (before, every worker stood in from
    memory and /readyz said 503 for good, through restarts, until it was removed by hand).
    """
    shared = tmp_path / "metadata.sqlite"
    rec = record()
    if damage == "torn":
        shared.write_bytes(b"not a database" * 512)
    else:
        first = open_metadata(None, ttl=TTL, shared=shared)
        for i in range(400):
            await first.put_tag("docker.io", f"library/r{i}", "1", rec)
        await first.close()
        with shared.open("r+b") as file:  # the pages past the schema's
            file.seek(3 * 4096)
            file.write(os.urandom(4 * 4096))
    changes: list[bool] = []
    metadata = open_metadata(None, ttl=TTL, shared=shared, on_change=changes.append)
    try:
        for _ in range(3):  # a damaged page is met by a call, then the file set aside
            await metadata.get_tag("docker.io", "library/r1", "1")
            await metadata.tags()
        await metadata.put_tag("docker.io", "library/alpine", "3", rec)
        await asyncio.sleep(1.1)  # the store's backoff after the call that met the damage
        assert await metadata.ping() is None
        await metadata.put_tag("docker.io", "library/alpine", "3", rec)
    finally:
        await metadata.close()
    assert [p.name.startswith("metadata.sqlite.bad-") for p in tmp_path.glob("*.bad-*")] == [True]
    other = open_metadata(None, ttl=TTL, shared=shared)  # another worker reads it
    try:
        assert await other.get_tag("docker.io", "library/alpine", "3") == rec
    finally:
        await other.close()


async def test_workers_whose_sqlite_file_was_deleted_share_the_new_one(tmp_path: Path) -> None:
    """The file deleted under two running workers (its journal files left), then a worker
    restarted: the restarted one makes the file anew, the two others move to it within a
    second, and the three share their records (before, the two went on together on the
    deleted file they still held, and the restarted one on its own, when the old journal
    files beside the new file did not fail it with a disk I/O error)."""
    shared = tmp_path / "metadata.sqlite"
    one, other = (open_metadata(None, ttl=TTL, shared=shared) for _ in range(2))
    restarted = None
    try:
        rec = record()
        await one.put_tag("docker.io", "library/before", "1", rec)
        assert await other.get_tag("docker.io", "library/before", "1") == rec
        shared.unlink()
        restarted = open_metadata(None, ttl=TTL, shared=shared)
        await restarted.put_tag("docker.io", "library/restarted", "1", rec)
        await asyncio.sleep(1.1)  # each connection looks at its path once a second
        assert await restarted.ping() is None
        await one.put_tag("docker.io", "library/after", "1", rec)
        for store in (one, other, restarted):
            for repo in ("library/restarted", "library/after"):
                assert await store.get_tag("docker.io", repo, "1") == rec, repo
    finally:
        for store in (one, other, restarted):
            if store is not None:
                await store.close()


async def test_a_sqlite_file_kept_locked_holds_up_neither_the_loop_threads_nor_metadata(
    tmp_path: Path,
) -> None:
    """A worker stopped mid-write, or a shell left in a transaction, keeps the workers'
    SQLite file locked. That costs metadata alone, and briefly: a cached blob hit's
    `os.stat` on the event loop's default threads runs at once, reads still answer from
    the file (another worker's record), and the writes queued together end within
    seconds, answered from memory. Before, each
    queued call held one of those threads for its turn plus a 5 s busy timeout: the stat
    waited minutes, the writes 5, 10, 15 ... s. (Each write waiting out a short timeout in
    turn would still take 10 s for these 40.)"""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=6))  # a 2-core host's
    shared = tmp_path / "metadata.sqlite"
    changes: list[bool] = []
    metadata = open_metadata(None, ttl=TTL, shared=shared, on_change=changes.append)
    held = sqlite3.connect(shared, isolation_level=None)
    reads: list[asyncio.Future[Any]] = []
    writes: list[asyncio.Future[Any]] = []
    try:
        warm, rec = record(DIGEST_B), record()
        other = open_metadata(None, ttl=TTL, shared=shared)  # another worker's record
        await other.put_tag("docker.io", "library/warm", "1", warm)
        await other.close()
        held.execute("BEGIN IMMEDIATE")
        held.execute("INSERT OR REPLACE INTO repos VALUES ('held')")
        put, get = metadata.put_tag, metadata.get_tag
        writes += [asyncio.ensure_future(put("docker.io", f"r{i}", "1", rec)) for i in range(40)]
        reads += [asyncio.ensure_future(get("docker.io", "library/warm", "1")) for _ in range(12)]
        await asyncio.sleep(0.2)  # every call queued for its thread
        stat = asyncio.ensure_future(asyncio.to_thread(os.stat, tmp_path))
        done, _ = await asyncio.wait([stat], timeout=5)
        assert done, "os.stat on the default threads waited for the metadata calls"
        _, waiting = await asyncio.wait(reads + writes, timeout=5)
        assert len(waiting) == 0, f"{len(waiting)} of 52 metadata calls still waiting after 5 s"
        assert [read.result() for read in reads] == [warm] * 12  # not in memory
        assert changes == [False]  # the writes fell to memory, and are answered from it
        assert await metadata.get_tag("docker.io", "r39", "1") == rec
    finally:
        held.rollback()
        held.close()
        await asyncio.gather(*reads, *writes, return_exceptions=True)
        await metadata.close()


_HAMMER = """
import asyncio, collections, sys, time
from pathlib import Path
from mirror.metadata.sqlite import SqliteMetadata
from mirror.metadata.store import TagRecord

async def main() -> None:
    db = SqliteMetadata(Path(sys.argv[1]), 600.0)
    errors: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        try:
            if i % 3 == 0:
                record = TagRecord("sha256:" + "a" * 64, "x", 1, time.time())
                await db.put_tag("up", f"r{i % 20}", "latest", record)
            elif i % 3 == 1:
                await db.get_tag("up", f"r{i % 20}", "latest")
            else:
                digests = [f"sha256:{n:064x}" for n in range(i % 7 + 2)]
                await db.add_holdings("up", f"r{i % 20}", digests, time.time())
        except Exception as exc:
            errors[f"{type(exc).__name__}: {exc}"] += 1

    end, i = time.monotonic() + float(sys.argv[2]), 0
    while time.monotonic() < end:
        await asyncio.gather(*(one(i + k) for k in range(64)))
        i += 64
    await db.close()
    print(dict(errors))

asyncio.run(main())
"""


def test_workers_writing_holdings_and_tags_at_once_get_no_errors(tmp_path: Path) -> None:
    """Three processes on one SQLite file, tags and holdings written and read at once for
    3 s: no call fails (before, holdings written by executemany in autocommit failed with
    "bad parameter or other API misuse" when another process held the lock midway, and
    the calls queued behind failed with it: the worker went over to memory)."""
    shared = tmp_path / "metadata.sqlite"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(shared), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for _ in range(3)
    ]
    try:
        outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert outputs == ["{}"] * 3


class _Failing(MemoryMetadata):
    """A shared store whose calls fail after a while (a Redis timing out): counted."""

    def __init__(self) -> None:
        super().__init__(TTL, 0.0)
        self.asked = 0

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        self.asked += 1
        await asyncio.sleep(0.2)
        raise TimeoutError("no answer")


async def test_once_its_backoff_is_over_one_call_asks_the_shared_store_again() -> None:
    """While the shared store is down, one call asks it again once the backoff is over and
    the others are answered from memory meanwhile (before, every call in flight then waited
    on it together)."""
    failing, now = _Failing(), [0.0]
    memory = MemoryMetadata(TTL, 0.0)
    rec = record()
    await memory.put_tag("docker.io", "library/alpine", "3", rec)
    metadata = FallbackMetadata(failing, memory, clock=lambda: now[0])
    assert await metadata.get_tag("docker.io", "library/alpine", "3") == rec
    assert not metadata.up

    now[0] += 60  # the backoff is over
    gets = [metadata.get_tag("docker.io", "library/alpine", "3") for _ in range(5)]
    assert await asyncio.gather(*gets) == [rec] * 5
    assert failing.asked == 2


async def test_a_redis_that_never_answers_costs_a_command_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command is held to COMMAND_DEADLINE whatever the client's retries (a Cluster that
    lost a master retried and read its layout again for 3-8 s a command): past it the
    deadline's TimeoutError, not the socket's after its retries."""
    monkeypatch.setattr(redis_metadata, "COMMAND_DEADLINE", 0.3)
    with RedisServer(tmp_path / "redis") as server:
        store = RedisMetadata(server.url, TTL)
        try:
            await store.put_tag("docker.io", "library/alpine", "3", record())
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError) as cut:
                    await store.get_tag("docker.io", "library/alpine", "3")
                assert type(cut.value) is TimeoutError  # not redis-py's, after 2 s
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            await store.close()


async def test_a_burst_on_a_healthy_redis_is_no_outage(tmp_path: Path) -> None:
    """20,000 lookups at once on a healthy Redis wait their turns on its connections: the
    wait is not counted against the deadline, so the store stays up (a deadline counting
    it took the burst for an outage, and went over to memory and back again and again)."""
    with RedisServer(tmp_path / "redis") as server:
        changes: list[bool] = []
        metadata = open_metadata(server.url, ttl=TTL, on_change=changes.append)
        try:
            gets = [metadata.get_tag("docker.io", f"r{i}", "1") for i in range(20_000)]
            assert await asyncio.gather(*gets) == [None] * 20_000
            assert changes == [] and metadata_up(metadata)
        finally:
            await metadata.close()


def metadata_up(metadata: MetadataStore) -> bool:
    assert isinstance(metadata, FallbackMetadata)
    return metadata.up


async def test_a_cluster_that_lost_a_master_is_not_ready(tmp_path: Path) -> None:
    """One of three masters killed: every live node still answers PING, but the lost
    master's keys fail. The store's ping (what /readyz and `mirror_metadata_up` hear) says
    so (before, it answered, and each /readyz put the mirror back on the failing Redis);
    records are answered from memory meanwhile."""
    require_redis_tools()
    with RedisClusterSetup(tmp_path / "cluster") as setup:
        metadata = open_metadata(setup.url, ttl=TTL)
        try:
            rec = record()
            for i in range(12):
                await metadata.put_tag("docker.io", f"library/r{i}", "1", rec)
            await metadata.ping()
            victim, *survivors = setup.nodes
            os.kill(victim.pid, signal.SIGKILL)
            wait_until(
                "cluster_state:fail on the survivors",
                lambda: all(
                    info_field(node.port, "cluster-info", "cluster_state") == "fail"
                    for node in survivors
                ),
                30,
                [node.log_path for node in setup.nodes],
            )
            with pytest.raises(DOWN_ERRORS):
                await metadata.ping()
            for i in range(12):
                assert await metadata.get_tag("docker.io", f"library/r{i}", "1") == rec
        finally:
            await metadata.close()
