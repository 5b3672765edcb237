"""Eviction among workers on one cache directory, tested within one process.

A `flock` taken through one open file conflicts with one taken through another open of the
same file, in one process as across processes: two apps here behave as two workers (each
app's `workers: 2` turns the sharing on), and a tally opened here is a third process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from mirror.cache.eviction import Evictor
from mirror.config import Config, StorageConfig
from mirror.config.s3 import S3Config
from mirror.observe.metrics import Metrics
from mirror.storage.filesystem import Storage
from mirror.storage.tally import SharedTally, Usage
from mirror.util.filelock import unlink_unread
from mirror.web.app import EVICTION_DIR
from mirror.web.keys import evictor_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rawclient import Client as RawClient
from tests.rawclient import Endpoint
from tests.resilience_helpers import metric_value
from tests.services import REPO_ROOT
from tests.test_s3 import local_blob, settled
from tests.workers_helpers import eventually

Client = TestClient[Any, Any]
KB = 1000


@contextlib.asynccontextmanager
async def no_pass_running(root: Path) -> AsyncIterator[None]:
    """Hold the turn, as a worker's pass would: no pass runs inside the block."""
    tally = SharedTally(root / EVICTION_DIR)
    while (turn := await asyncio.to_thread(tally.take_turn)) is None:
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        turn.release()


def blob_file(root: Path, digest: str) -> Path:
    return local_blob(root, digest)


def blobs_size(root: Path) -> int:
    return sum(path.stat().st_size for path in (root / "blobs").rglob("*") if path.is_file())


async def metric(client: Client, name: str) -> float:
    value = metric_value(await (await client.get("/metrics")).text(), name)
    return 0.0 if value is None else value


async def fetch(client: Client, digest: str) -> bytes:
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    body: bytes = await resp.read()
    return body


async def two_workers(make_client: MakeClient, config: Config, **storage: Any) -> list[Client]:
    """Two apps on one cache directory, each as a worker of `workers: 2`."""
    changed = replace(config.storage, **storage)
    return [await make_client(workers=2, storage=changed) for _ in range(2)]


# --- the tally and the turn ----------------------------------------------------------------


def test_processes_add_to_one_count_and_take_turns(tmp_path: Path) -> None:
    first, second = SharedTally(tmp_path), SharedTally(tmp_path)
    first.add(100, blob=True)
    second.add(50, blob=True)
    second.add(7, blob=False)  # a manifest: in the size, not the bound
    assert first.read() == Usage(
        blobs=150, landed=150, size=157, objects=3, grown=157, arrived=3, passed=0.0
    )

    turn = first.take_turn()
    assert turn is not None
    assert second.take_turn() is None
    start = first.read()
    second.add(20, blob=True)  # lands while the pass scans: counted on top of its result
    settled = first.settle(start, blobs=90, size=100, objects=2)
    assert (settled.blobs, settled.landed, settled.size, settled.objects) == (110, 170, 120, 3)
    assert settled.passed > 0
    turn.release()
    again = second.take_turn()
    assert again is not None
    again.release()


def test_a_start_counts_what_another_process_landed_while_it_scanned(tmp_path: Path) -> None:
    """A worker that starts while another lands a blob: its scan used to be written over
    the count, the other's blob lost (the size gauge stayed short of the directory)."""
    serving, starting = SharedTally(tmp_path), SharedTally(tmp_path)
    serving.add(100, blob=True)
    begun = starting.read()
    serving.add(30, blob=True)  # lands after the scan passed its directory
    usage = starting.recount(begun, size=100, objects=1)  # what the scan found
    assert (usage.blobs, usage.size, usage.objects) == (130, 130, 2)
    assert serving.read() == usage


def test_a_tally_that_does_not_parse_counts_as_never_passed(tmp_path: Path) -> None:
    (tmp_path / "tally").write_text("garbage\n")
    assert SharedTally(tmp_path).read() == Usage()
    assert SharedTally(tmp_path).add(5, blob=True).blobs == 5


HOLD_TURN = """
import sys, time
from pathlib import Path
from mirror.storage.tally import SharedTally
turn = SharedTally(Path(sys.argv[1])).take_turn()
print("held" if turn is not None else "taken", flush=True)
time.sleep(600)
"""


def test_a_turn_held_by_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    command = [sys.executable, "-c", HOLD_TURN, str(tmp_path)]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert SharedTally(tmp_path).take_turn() is None
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(30)
            turn = SharedTally(tmp_path).take_turn()
            assert turn is not None
            turn.release()
        finally:
            holder.kill()


def test_a_file_locked_by_a_reader_is_not_unlinked(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    storage.shared = True
    path = tmp_path / "blob"
    path.write_bytes(b"x")
    with storage.open_reading(path):
        assert unlink_unread(str(path)) is False
        assert path.exists()
    assert unlink_unread(str(path)) is True
    assert not path.exists()
    assert unlink_unread(str(path)) is None


async def test_one_pass_per_interval_among_the_processes(tmp_path: Path) -> None:
    """Each worker's evictor looks when its start comes and every SCAN_INTERVAL after: the
    first to look scans, the others find the pass done and wait for the next."""
    storage = Storage(tmp_path / "data")
    await storage.open()
    (storage.blobs / "sha256" / "ab").mkdir(parents=True)
    (storage.blobs / "sha256" / "ab" / ("ab" * 32)).write_bytes(b"x" * 100)
    metrics = [Metrics(), Metrics()]
    evictors = [
        Evictor(storage, m, 1000, None, tuple, SharedTally(tmp_path / "data" / EVICTION_DIR))
        for m in metrics
    ]
    pauses = [await evictor.pass_if_due() for evictor in evictors]
    passes = [m.registry.get_sample_value("mirror_eviction_passes_total") for m in metrics]
    assert passes == [1, 0]
    assert all(pause > 0 for pause in pauses)


# --- two apps on one directory ---------------------------------------------------------------


async def test_the_bound_holds_over_both_workers_downloads(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    """Each worker lands less than max_size, both together more: the shared count sets
    off a pass. (Each counting only its own, no pass ever ran.)"""
    first, second = await two_workers(make_client, config, max_size=1000 * KB)
    digests = [hub.content.add_blob(os.urandom(150 * KB)) for _ in range(8)]
    for index, digest in enumerate(digests):
        await fetch((first, second)[index % 2], digest)
    root = config.storage.path
    landed = 8 * 150 * KB
    await eventually("every blob counted", lambda: _tally(config).landed == landed)
    await eventually("the directory under max_size", lambda: blobs_size(root) <= 1000 * KB)
    async with no_pass_running(root):
        evicted = [await metric(app, "mirror_evictions_total") for app in (first, second)]
        left = [blob_file(root, d).exists() for d in digests]
        assert blobs_size(root) <= 1000 * KB
    assert sum(evicted) == left.count(False) > 0
    assert left[-1], "the newest blob was evicted"


async def test_a_blob_one_worker_sends_is_not_evicted_by_the_other(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    reader, evictor = await two_workers(make_client, config, max_size=50_000 * KB)
    layer = os.urandom(16 * 1024 * 1024)  # beyond what the socket buffers take: sent slowly
    digest = hub.content.add_blob(layer)
    assert await fetch(reader, digest) == layer
    path = blob_file(config.storage.path, digest)
    await eventually("the blob in the cache", path.exists)  # renamed after the last byte

    # A connection of its own with a small, fixed window (tests/rawclient.py): a pooled
    # one may have grown enough to take the whole body, and the sender to be done.
    assert reader.server.port is not None
    slow = await RawClient.open(Endpoint(reader.server.port), rcvbuf=64 * 1024)
    try:
        status, _ = await slow.ask(f"/v2/library/app/blobs/{digest}")
        assert status == 200
        head = await slow.reader.readexactly(1000)
        result = await evictor.app[evictor_key].evict(max_size=1)

        assert path.exists(), "evicted while the other worker sent it"
        assert result.evicted == 0
        assert head + await slow.reader.readexactly(len(layer) - 1000) == layer
    finally:
        await slow.close()

    async def evicted() -> bool:  # once its reader is done, the blob goes like any other
        await evictor.app[evictor_key].evict(max_size=1)
        return not path.exists()

    await eventually("the blob evicted once read", evicted)


async def test_a_pass_waits_for_the_turn_another_process_holds(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    app = await make_client(workers=2, storage=replace(config.storage, max_size=10**9))
    digest = hub.content.add_blob(os.urandom(10 * KB))
    await fetch(app, digest)
    path = blob_file(config.storage.path, digest)
    await eventually("the blob in the cache", path.exists)
    turn = SharedTally(config.storage.path / EVICTION_DIR).take_turn()
    assert turn is not None  # another process's pass runs

    evicting = asyncio.create_task(app.app[evictor_key].evict(max_size=1))
    await asyncio.sleep(0.5)
    assert not evicting.done() and path.exists()
    turn.release()
    result = await evicting
    assert result.evicted == 1 and not path.exists()


async def test_the_size_gauge_counts_both_workers_writes(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    """/metrics with workers shows the most recent worker's value: each one's is the
    whole directory's, not its own writes over its start's scan."""
    first, second = await two_workers(make_client, config)
    one, two = os.urandom(300 * KB), os.urandom(200 * KB)
    await fetch(first, hub.content.add_blob(one))
    await eventually("the first blob counted", lambda: _tally(config).size == len(one))
    await fetch(second, hub.content.add_blob(two))

    async def shown() -> bool:
        return await metric(second, "mirror_cache_size_bytes") == len(one + two)

    await eventually("the second worker's gauge with both blobs", shown)
    assert await metric(second, "mirror_cache_objects") == 2


def _tally(config: Config) -> Usage:
    return SharedTally(config.storage.path / EVICTION_DIR).read()


# --- the local tier in front of a bucket -----------------------------------------------------


async def test_the_local_tiers_bucket_reads_are_counted_and_kept_while_sent(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config
) -> None:
    """A whole object read from the bucket lands in the local tier: counted against
    max_size, and not evicted by the other worker while its reader sends it."""
    layer = os.urandom(16 * 1024 * 1024)
    digest = hub.content.add_blob(layer)
    filler = await make_client(storage=StorageConfig(path=tmp_path / "filler", s3=s3))
    assert await fetch(filler, digest) == layer
    await settled(filler)  # in the bucket now; the two workers' local tier is empty

    tier = StorageConfig(path=tmp_path / "tier", s3=s3, max_size=1024 * 1024 * 1024)
    reader, evictor = [await make_client(workers=2, storage=tier) for _ in range(2)]
    resp = await reader.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    head = await resp.content.readexactly(1000)
    path = blob_file(tmp_path / "tier", digest)
    await eventually("the bucket's copy kept locally", path.exists)
    tally = SharedTally(tmp_path / "tier" / EVICTION_DIR)
    await eventually("it counted", lambda: tally.read().blobs == len(layer))

    result = await evictor.app[evictor_key].evict(max_size=1)
    assert path.exists() and result.evicted == 0
    assert head + await resp.read() == layer


def test_a_count_a_later_release_wrote_with_more_fields_is_read_and_kept_whole(
    tmp_path: Path,
) -> None:
    """Rolled back over a tally with a field this release does not know: the counts are
    read (zeros would pass the directory again and again), and a settle leaves no tail."""
    tally = SharedTally(tmp_path)
    tally.add(1000, blob=True)
    path = tmp_path / "tally"
    path.write_bytes(path.read_bytes().rstrip(b"\n") + b" " + b"7".rjust(40) + b"\n")
    assert tally.read().blobs == 1000

    start = tally.read()
    settled = tally.settle(start, 500, 600, 3)

    read = tally.read()
    assert (read.blobs, read.size, read.objects) == (500, 600, 3)
    assert abs(read.passed - settled.passed) < 0.01 and read.passed > 0
    assert path.read_bytes().count(b"\n") == 1
