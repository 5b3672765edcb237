"""Eviction with worker processes on one cache directory: one pass at a time, over all of
their downloads, never of a blob one of them is sending.

    clients (aiohttp) -> 2 workers of `mirror serve` (workers: 2, one --storage) -> fake hub

The test is the supervisor (tests/workers_helpers.py): each worker on a socket of its own,
so the test chooses which one a client reaches, reads each one's /metrics, or kills one.
The last test runs a real supervisor, whose /metrics reads all the workers' files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from mirror.storage.tally import SharedTally, Usage
from mirror.web.app import EVICTION_DIR
from tests.fakehub import FakeHub
from tests.rawclient import Client, Endpoint
from tests.resilience_helpers import cached_blob_path, log_since_last_start, write_config
from tests.services import REPO_ROOT, MirrorProcess
from tests.workers_helpers import eventually, start_workers

MIB = 1024 * 1024
REPO = "library/app"
READER_WINDOW = 64 * 1024


def tally(cache: Path) -> Usage:
    return SharedTally(cache / EVICTION_DIR).read()


def blobs_size(cache: Path) -> int:
    return sum(path.stat().st_size for path in (cache / "blobs").rglob("*") if path.is_file())


@contextlib.asynccontextmanager
async def no_pass_running(cache: Path) -> AsyncIterator[None]:
    """Hold the turn, as a worker's pass would: no pass runs inside the block."""
    shared = SharedTally(cache / EVICTION_DIR)
    while (turn := await asyncio.to_thread(shared.take_turn)) is None:
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        turn.release()


def metric_sum(text: str, name: str) -> float:
    """Every sample of `name` added up (all label values)."""
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$")
    return sum(float(m.group(2)) for line in text.splitlines() if (m := pattern.match(line)))


async def metric(session: aiohttp.ClientSession, process: MirrorProcess, name: str) -> float:
    async with session.get(f"{process.url}/metrics") as resp:
        return metric_sum(await resp.text(), name)


async def total(session: aiohttp.ClientSession, processes: list[MirrorProcess], name: str) -> float:
    return sum([await metric(session, process, name) for process in processes])


async def fetch(session: aiohttp.ClientSession, process: MirrorProcess, digest: str) -> None:
    async with session.get(f"{process.url}/v2/{REPO}/blobs/{digest}") as resp:
        assert resp.status == 200
        await resp.read()


async def fetch_through(
    session: aiohttp.ClientSession,
    hub: FakeHub,
    processes: list[MirrorProcess],
    count: int,
    size: int = MIB,
) -> list[str]:
    """`count` new blobs of `size`, each through the next process in turn."""
    digests = [hub.content.add_blob(os.urandom(size)) for _ in range(count)]
    for index, digest in enumerate(digests):
        await fetch(session, processes[index % len(processes)], digest)
    return digests


def bounded(max_size: int) -> dict[str, object]:
    return {"storage": {"max_size": max_size}}


async def test_blobs_through_both_workers_keep_the_directory_under_max_size(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Each worker lands 8 MiB, both 16 MiB, over a bound of 8 MiB: the passes hold it.
    (Each counting only its own, neither passed the bound, and the directory grew.)"""
    workers = await start_workers(stack, tmp_path, hub, **bounded(8 * MIB))
    cache = tmp_path / "cache"
    # Both started on the same directory: the first to look made the start's pass, the
    # other found it made.
    await eventually("the start's pass", lambda: tally(cache).passed > 0)
    async with no_pass_running(cache):
        assert await total(session, workers, "mirror_eviction_passes_total") == 1

    await fetch_through(session, hub, workers, 16)
    await eventually("every blob counted", lambda: tally(cache).landed == 16 * MIB)
    await eventually("the directory under max_size", lambda: blobs_size(cache) <= 8 * MIB)
    async with no_pass_running(cache):
        size = blobs_size(cache)
        evicted = await total(session, workers, "mirror_evictions_total")
    assert size <= 8 * MIB
    # Not over-evicted: a pass stops at 90% of the bound, one blob below at most.
    assert size > 0.9 * 8 * MIB - MIB
    assert evicted == 16 - size // MIB


async def test_a_blob_one_worker_streams_is_left_by_the_other_workers_pass(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sender, other = await start_workers(stack, tmp_path, hub, **bounded(48 * MIB))
    cache = tmp_path / "cache"
    layer = os.urandom(32 * MIB)  # more than the sockets buffer: the sender waits on its reader
    digest = hub.content.add_blob(layer)
    await fetch(session, sender, digest)
    path = cached_blob_path(cache, digest)
    await eventually("the blob in the cache", path.exists)

    # A connection of its own with a small, fixed window: the sender cannot finish (a
    # pooled one, whose window Linux grew during the first fetch, can take the whole body).
    reader = await Client.open(Endpoint(sender.port), rcvbuf=READER_WINDOW)
    try:
        status, headers = await reader.ask(f"/v2/{REPO}/blobs/{digest}")
        assert status == 200
        head = await reader.reader.readexactly(MIB)  # a slow reader: the rest waits
        past = time.time() - 3600
        os.utime(path, (past, past))  # the least recently read: the first a pass would take
        await fetch_through(session, hub, [other], 5, 4 * MIB)  # 52 MiB: over the bound
        await eventually("every blob counted", lambda: tally(cache).landed == 52 * MIB)
        await eventually("a pass", lambda: blobs_size(cache) <= 48 * MIB)
        async with no_pass_running(cache):
            assert path.exists(), "evicted while the other worker sent it"
            assert await total(session, [sender, other], "mirror_evictions_total") > 0
        rest = await reader.reader.readexactly(int(headers["content-length"]) - MIB)
        body = head + rest
    finally:
        await reader.close()
    assert body == layer


HOLD_TURN = """
import sys, time
from pathlib import Path
from mirror.storage.tally import SharedTally
turn = SharedTally(Path(sys.argv[1])).take_turn()
print("held" if turn is not None else "taken", flush=True)
time.sleep(600)
"""


async def test_a_pass_holder_killed_mid_pass_another_worker_evicts(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A process that holds the turn (a worker in the middle of a pass) is killed with
    SIGKILL: the kernel frees the turn, and a worker that saw the bound passed takes it."""
    workers = await start_workers(stack, tmp_path, hub, **bounded(8 * MIB))
    cache = tmp_path / "cache"
    await eventually("the start's pass", lambda: tally(cache).passed > 0)
    command = [sys.executable, "-c", HOLD_TURN, str(cache / EVICTION_DIR)]
    holder = stack.enter_context(
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    )
    stack.callback(holder.kill)
    assert holder.stdout is not None
    assert await asyncio.to_thread(holder.stdout.readline) == "held\n"

    await fetch_through(session, hub, workers, 12)
    await eventually("every blob counted", lambda: tally(cache).landed == 12 * MIB)
    assert blobs_size(cache) == 12 * MIB  # over the bound, and no pass without the turn
    assert await total(session, workers, "mirror_eviction_passes_total") == 1

    os.kill(holder.pid, signal.SIGKILL)
    await eventually("the directory under max_size", lambda: blobs_size(cache) <= 8 * MIB)
    assert await total(session, workers, "mirror_eviction_passes_total") >= 2


async def test_the_evicting_worker_killed_the_other_evicts_afterwards(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    workers = await start_workers(stack, tmp_path, hub, **bounded(8 * MIB))
    cache = tmp_path / "cache"
    await fetch_through(session, hub, workers, 10)
    await eventually("every blob counted", lambda: tally(cache).landed == 10 * MIB)
    await eventually("a pass over the bound", lambda: blobs_size(cache) <= 8 * MIB)
    async with no_pass_running(cache):
        evicted = [await metric(session, w, "mirror_evictions_total") for w in workers]
    killed = workers[evicted.index(max(evicted))]
    (survivor,) = [w for w in workers if w is not killed]
    os.kill(killed.pid, signal.SIGKILL)
    before = await metric(session, survivor, "mirror_evictions_total")

    await fetch_through(session, hub, [survivor], 6)
    await eventually("every blob counted", lambda: tally(cache).landed == 16 * MIB)
    await eventually("the survivor's pass", lambda: blobs_size(cache) <= 8 * MIB)
    assert await metric(session, survivor, "mirror_evictions_total") > before


async def test_a_supervisors_metrics_show_the_directory_not_one_workers_share(
    hub: FakeHub, stack: ExitStack, tmp_path: Path
) -> None:
    """/metrics reads every worker's file: the size gauge is the most recent worker's value,
    the directory's as they count it together (the largest worker's own count was less
    than the directory once both had written)."""
    config = {"workers": 2, "log": {"format": "json"}, **bounded(64 * MIB)}
    path = write_config(tmp_path / "mirror.yml", config)
    mirror = MirrorProcess(
        tmp_path / "mirror", hub.registry_url, extra_args=["--config", str(path)]
    )
    await asyncio.to_thread(stack.enter_context, mirror)
    cache = tmp_path / "mirror" / "data"
    # A new connection per request: the kernel hands each to whichever worker accepts it.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        fetched = 0
        while fetched < 40 and len(workers_that_fetched(mirror)) < 2:
            await fetch_through(session, hub, [mirror], 1)
            fetched += 1
        assert len(workers_that_fetched(mirror)) == 2, "one worker fetched every blob"

        async def shown() -> bool:
            async with session.get(f"{mirror.url}/metrics") as resp:
                text = await resp.text()
            return metric_sum(text, "mirror_cache_size_bytes") == fetched * MIB

        await eventually("the directory's size on /metrics", shown)
    assert blobs_size(cache) == fetched * MIB


def workers_that_fetched(mirror: MirrorProcess) -> set[int]:
    """The workers whose log says they cached a blob."""
    found = set()
    for line in log_since_last_start(mirror.log_path).splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["message"].startswith("blob sha256:") and " cached: " in record["message"]:
                found.add(record["worker"])
    return found
