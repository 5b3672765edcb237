"""The bucket's chores among the workers of one host (storage/hostshare.py): two shares on
one directory hold their locks as two worker processes do (flock: one lock per open file)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from mirror.config.s3 import S3Config
from mirror.storage.hostshare import CHORES_LOCK, MAX_IN_GRACE, READS, HostShare
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rgw import CephRGW
from tests.test_s3 import key, settled, storage

Client = TestClient[Any, Any]
MiB = 1024 * 1024
DIGEST = "sha256:" + "6" * 64


async def test_an_object_read_by_one_worker_is_read_elsewhere_for_the_others_until_its_grace(
    tmp_path: Path,
) -> None:
    reader, evictor = HostShare(tmp_path), HostShare(tmp_path)
    assert not await evictor.read_elsewhere(DIGEST)
    await reader.begin_read(DIGEST)
    await reader.begin_read(DIGEST)  # two streams of it
    assert await evictor.read_elsewhere(DIGEST)
    await reader.end_read(DIGEST, 0.0)
    await asyncio.sleep(0.2)
    assert await evictor.read_elsewhere(DIGEST)  # one stream still runs
    await reader.end_read(DIGEST, 0.5)
    assert await evictor.read_elsewhere(DIGEST)  # within its grace
    await asyncio.sleep(0.8)
    assert not await evictor.read_elsewhere(DIGEST)
    assert os.listdir(tmp_path / READS) == []  # no file left per object read
    for share in (reader, evictor):
        await share.close()


async def test_a_stream_begun_in_the_grace_keeps_its_mark(tmp_path: Path) -> None:
    reader, evictor = HostShare(tmp_path), HostShare(tmp_path)
    await reader.begin_read(DIGEST)
    await reader.end_read(DIGEST, 0.2)
    await reader.begin_read(DIGEST)
    await asyncio.sleep(0.4)
    assert await evictor.read_elsewhere(DIGEST)
    await reader.close()  # a worker that stops lets its marks go
    assert not await evictor.read_elsewhere(DIGEST)
    await evictor.close()


async def test_one_worker_at_a_time_runs_the_bucket_chores(tmp_path: Path) -> None:
    first, second = HostShare(tmp_path), HostShare(tmp_path)
    async with first.exclusive() as mine:
        assert mine
        async with second.exclusive() as theirs:
            assert not theirs
    async with second.exclusive() as theirs:
        assert theirs


async def test_a_chores_lock_that_cannot_be_opened_skips_the_turn(tmp_path: Path) -> None:
    """EMFILE, a read-only directory, something else at the path: this turn is skipped
    (as when another worker holds it), the next one is taken once the lock opens."""
    (tmp_path / CHORES_LOCK).mkdir()  # os.open(O_RDWR) on it: EISDIR
    share = HostShare(tmp_path)
    async with share.exclusive() as mine:
        assert not mine
    (tmp_path / CHORES_LOCK).rmdir()
    async with share.exclusive() as mine:
        assert mine


async def test_marks_kept_past_their_streams_are_bounded(tmp_path: Path) -> None:
    """Each object in its grace holds a descriptor: past MAX_IN_GRACE the oldest go early."""
    reader, evictor = HostShare(tmp_path), HostShare(tmp_path)
    digests = [f"sha256:{n:064x}" for n in range(MAX_IN_GRACE + 50)]
    for digest in digests:
        await reader.begin_read(digest)
        await reader.end_read(digest, 300.0)
    await asyncio.sleep(0.3)  # the early ones let go in the background
    assert len(os.listdir(tmp_path / READS)) == MAX_IN_GRACE
    assert not await evictor.read_elsewhere(digests[0])
    assert await evictor.read_elsewhere(digests[-1])
    await reader.close()


async def test_a_workers_eviction_pass_leaves_what_another_worker_streams_from_the_bucket(
    hub: FakeHub, make_client: MakeClient, tmp_path: Path, s3: S3Config, rgw: CephRGW
) -> None:
    """Two workers (`workers: 2`) on one directory in front of a bucket: the one evicting
    leaves the object the other is sending to a client, as replicas do."""
    layer = os.urandom(10 * MiB)
    digest = hub.content.add_blob(layer)
    idle = hub.content.add_blob(os.urandom(MiB))  # read by nobody: evicted
    filler = await make_client(storage=storage(tmp_path, s3, "filler"))
    for each in (digest, idle):
        await (await filler.get(f"/v2/library/app/blobs/{each}")).read()
    await settled(filler)
    workers = [await make_client(storage=storage(tmp_path, s3, "host"), workers=2) for _ in "ab"]

    resp = await workers[0].get(f"/v2/library/app/blobs/{digest}")
    head = await resp.content.readexactly(1000)  # the rest still to come from the bucket
    store = workers[1].app[storage_key]
    assert isinstance(store, TieredStorage)
    evicted = (await store.index.evict(max_size=1)).evicted

    assert head + await resp.read() == layer
    assert evicted == 1
    assert rgw.s3().keys(s3.bucket, "cache/blobs/") == [key("blobs", digest)]
