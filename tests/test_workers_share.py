"""Worker processes on one cache directory behave as one mirror, with or without Redis.

    clients (aiohttp) -> 2 workers of `mirror serve` (workers: 2, one --storage) -> fake hub

Each worker is started as the supervisor starts one (tests/workers_helpers.py); here the
test is the supervisor and gives each worker a socket of its own, so that it can choose
which one a client reaches, or kill one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import pytest

from tests.fakehub import FakeHub
from tests.resilience_helpers import MANIFEST_ACCEPT
from tests.services import MirrorProcess, RedisServer
from tests.workers_helpers import TAG_TTL, start_workers

pytestmark = pytest.mark.e2e

BIG = 64 * 1024 * 1024
REPO = "library/big"


async def get_blob(
    session: aiohttp.ClientSession, process: MirrorProcess, digest: str
) -> tuple[int, str]:
    """(status, sha256 of the body) of one blob GET."""
    async with session.get(f"{process.url}/v2/{REPO}/blobs/{digest}") as resp:
        hasher = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(1024 * 1024):
            hasher.update(chunk)
        return resp.status, "sha256:" + hasher.hexdigest()


def big_blob(hub: FakeHub) -> str:
    data = os.urandom(BIG)
    return hub.content.add_blob(data)


async def test_concurrent_cold_gets_across_processes_fetch_a_blob_once(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    digest = big_blob(hub)
    processes = await start_workers(stack, tmp_path, hub)
    hub.cdn_delay = 0.001  # a transfer of a few seconds: every request overlaps it
    answers = await asyncio.gather(*(get_blob(session, processes[i % 2], digest) for i in range(8)))
    assert answers == [(200, digest)] * 8
    assert hub.stats["blob_get"] == 1
    assert hub.stats.cdn_get_by_digest[digest] == 1


async def test_with_redis_too_a_blob_is_fetched_once(
    hub: FakeHub,
    stack: ExitStack,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    digest = big_blob(hub)
    processes = await start_workers(stack, tmp_path, hub, redis_server.url)
    hub.cdn_delay = 0.001
    answers = await asyncio.gather(*(get_blob(session, processes[i % 2], digest) for i in range(8)))
    assert answers == [(200, digest)] * 8
    assert hub.stats["blob_get"] == 1
    assert hub.stats.cdn_get_by_digest[digest] == 1


async def test_the_owner_killed_mid_transfer_another_process_takes_over(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    digest = big_blob(hub)
    owner, other = await start_workers(stack, tmp_path, hub)
    hub.cdn_delay = 0.003  # about 3 s for the whole blob
    # The first client makes `owner` fetch it; once bytes flow, clients of `other` follow.
    first = await session.get(f"{owner.url}/v2/{REPO}/blobs/{digest}")
    assert first.status == 200
    received = len(await first.content.readexactly(4 * 1024 * 1024))
    followers = [asyncio.create_task(get_blob(session, other, digest)) for _ in range(3)]
    await asyncio.sleep(0.5)
    os.kill(owner.pid, signal.SIGKILL)
    try:
        while await first.content.read(1024 * 1024):
            received += 1
    except aiohttp.ClientError:
        pass  # cut with the process: a short body
    first.release()
    assert await asyncio.gather(*followers) == [(200, digest)] * 3
    # The killed process's client asks the other process again: it gets the blob whole.
    assert await get_blob(session, other, digest) == (200, digest)
    assert hub.stats["blob_get"] == 2  # the first fetch, then one resume
    # GETs only: the other process's clients first confirm the repository holds the blob
    # (a HEAD, which the hub also sends to its CDN) before they follow another's download.
    ranged = [path for app, method, path in hub.stats.requests if (app, method) == ("cdn", "GET")]
    assert len(ranged) == 2
    log = other.log_path.read_text()
    assert "taken over from a process that stopped at byte" in log
    owner.stop()


async def test_a_tag_revalidates_once_across_processes(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = hub.content.add_image("library/app", "latest", [b"layer"])
    first, second = await start_workers(stack, tmp_path, hub)
    url = "/v2/library/app/manifests/latest"
    async with session.get(first.url + url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
        assert resp.status == 200
    await asyncio.sleep(TAG_TTL + 0.2)
    hub.reset_stats()
    hub.manifest_delay = 0.3  # the revalidations would overlap for sure

    async def get(process: MirrorProcess) -> tuple[int, str]:
        async with session.get(process.url + url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
            await resp.read()
            return resp.status, resp.headers["Docker-Content-Digest"]

    answers = await asyncio.gather(*(get((first, second)[i % 2]) for i in range(10)))
    assert answers == [(200, image["digest"])] * 10
    assert hub.stats["manifest_head"] == 1
    assert hub.stats["manifest_get"] == 0


async def test_one_token_per_scope_across_processes(
    hub: FakeHub, stack: ExitStack, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = hub.content.add_image("library/tok", "latest", [b"layer"])
    processes = await start_workers(stack, tmp_path, hub)
    hub.token_delay = 0.3  # concurrent token fetches would overlap for sure
    url = f"/v2/library/tok/manifests/{image['digest']}"

    # A HEAD by digest is asked upstream by each process (no lease: it stores nothing),
    # so each needs a token for the same scope.
    async def head(process: MirrorProcess) -> int:
        async with session.head(process.url + url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
            return resp.status

    assert await asyncio.gather(*(head(processes[i % 2]) for i in range(6))) == [200] * 6
    assert hub.stats["manifest_head"] >= 2  # both processes asked the upstream
    assert hub.stats["token"] == 1
