"""Upload parts read into buffers kept for the next part (storage/s3/upload.py), and sent
from them as they are (storage/s3/partbody.py), against a real Ceph RGW."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import warnings
from pathlib import Path

import pytest

from mirror.allocator import return_large_blocks
from mirror.config.s3 import S3Config
from mirror.observe.metrics import Metrics
from mirror.storage.s3.bucket import Bucket
from mirror.storage.s3.partbody import PartBody
from mirror.storage.s3.upload import BucketUpload, PartBuffers, part_size
from tests.rgw import CephRGW

MiB = 1024 * 1024
PAGE = resource.getpagesize()


def blob_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def upload(bucket: Bucket, key: str, path: Path, buffers: PartBuffers) -> None:
    stored: list[int] = []
    size = path.stat().st_size
    up = BucketUpload(bucket, key, size, path, stored.append, buffers)
    up.progress(size)
    await up.complete()
    assert stored == [size], f"{key} was not stored"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# --- the buffers ----------------------------------------------------------------------------


async def test_a_buffer_is_lent_again_after_its_part_went_up() -> None:
    buffers = PartBuffers(2)
    async with buffers.lend(MiB) as first:
        pass
    async with buffers.lend(MiB) as second:
        assert second is first
    assert buffers.kept() == 1


async def test_a_buffer_whose_part_failed_is_dropped() -> None:
    """A failed send may leave a socket still holding a view of it: never lent again."""
    buffers = PartBuffers(2)
    with pytest.raises(OSError):
        async with buffers.lend(MiB) as failed:
            raise OSError("the bucket went away")
    assert buffers.kept() == 0
    async with buffers.lend(MiB) as fresh:
        assert fresh is not failed


async def test_a_larger_part_gets_a_buffer_of_its_size() -> None:
    buffers = PartBuffers(2)
    async with buffers.lend(MiB):
        pass
    async with buffers.lend(3 * MiB) as larger:
        assert len(larger) == 3 * MiB


async def test_no_more_buffers_than_slots_are_lent_at_once() -> None:
    buffers = PartBuffers(2)
    release = asyncio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with buffers.lend(MiB):
            holding += 1
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert holding == 2
    release.set()
    await asyncio.gather(*tasks)
    assert holding == 3
    assert buffers.kept() <= 2


async def test_idle_buffers_are_let_go() -> None:
    buffers = PartBuffers(2, keep_idle=0.05)
    async with buffers.lend(MiB):
        pass
    assert buffers.kept() == 1
    await asyncio.sleep(0.2)
    assert buffers.kept() == 0


# --- the body -------------------------------------------------------------------------------


def test_a_part_body_reads_and_rewinds_as_botocore_needs() -> None:
    data = os.urandom(1000)
    body = PartBody(memoryview(bytearray(data)))
    assert len(body) == 1000
    assert body.read(10) == data[:10]
    assert body.tell() == 10
    assert body.read() == data[10:]
    assert body.seek(0) == 0  # before a retry
    assert body.read() == data
    assert body.seek(-5, 2) == 995


# --- against RGW ----------------------------------------------------------------------------


@pytest.fixture
async def bucket(s3: S3Config) -> Bucket:
    opened = Bucket(s3, Metrics())
    await opened.open()
    yield opened  # type: ignore[misc]
    await opened.close()


async def test_uploads_sharing_two_buffers_each_land_their_own_bytes(
    bucket: Bucket, tmp_path: Path, rgw: CephRGW, s3: S3Config
) -> None:
    """Three uploads of 2½ parts each, at once, through two buffers that go from one
    upload's part to another's: every object holds its own file's bytes."""
    size = part_size(20 * MiB) * 2 + 3 * MiB
    files = [blob_file(tmp_path / f"blob{n}", size) for n in range(3)]
    buffers = PartBuffers(2)

    await asyncio.gather(*(upload(bucket, f"b{n}", f, buffers) for n, f in enumerate(files)))

    for n, path in enumerate(files):
        assert rgw.s3().get(s3.bucket, f"b{n}") == path.read_bytes()
    assert buffers.kept() <= 2


async def test_parts_go_up_from_kept_buffers_not_new_memory(
    bucket: Bucket, tmp_path: Path, rgw: CephRGW, s3: S3Config
) -> None:
    """With the allocator as `mirror serve` sets it (blocks of 4 MiB and more are mapped
    afresh and unmapped when freed), a new buffer per part is 2,048 page faults, twice
    over when the body is copied once more: 8 parts of 8 MiB, 32,768. Through the kept
    buffers the second upload touches no new part memory."""
    return_large_blocks()
    path = blob_file(tmp_path / "blob", 8 * part_size(64 * MiB))
    buffers = PartBuffers(2)
    await upload(bucket, "first", path, buffers)  # the buffers are made here

    # The count is the whole test process's: what an earlier test left running can fault
    # pages meanwhile (in full runs, 5,141 once, and 3,075 for the quieter of two). Of two
    # uploads the quieter one counts, held to a quarter of what new buffers per part make.
    counts = []
    for key in ("second", "third"):
        before = minor_faults()
        await upload(bucket, key, path, buffers)
        counts.append(minor_faults() - before)
    faults = min(counts)

    fresh = 8 * 2 * part_size(64 * MiB) // PAGE  # a buffer per part, the body copied once more
    assert faults < fresh // 4, faults
    assert rgw.s3().get(s3.bucket, "second") == path.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 3 * MiB])
async def test_a_blob_smaller_than_a_part_goes_up_whole(
    bucket: Bucket, tmp_path: Path, rgw: CephRGW, s3: S3Config, size: int
) -> None:
    """One PutObject from a buffer, the empty blob too."""
    path = blob_file(tmp_path / "small", size)
    buffers = PartBuffers(2)
    await upload(bucket, "small", path, buffers)
    assert rgw.s3().get(s3.bucket, "small") == path.read_bytes()


async def test_an_upload_cancelled_while_its_file_opens_leaves_no_file_open(
    bucket: Bucket, tmp_path: Path
) -> None:
    """The loop's teardown cancels an upload whose thread is opening the temp file (here a
    FIFO, whose open waits for a writer): the file the thread then opens is closed, not
    left to the garbage collector (a descriptor held meanwhile, and a ResourceWarning)."""
    fifo = tmp_path / "temp"
    os.mkfifo(fifo)
    up = BucketUpload(bucket, "cache/blobs/fifo", 5, fifo, lambda _: None, PartBuffers())
    up.progress(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = asyncio.create_task(up.complete())
        await asyncio.sleep(0.2)  # its thread waits in open()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the thread's open returns
        await asyncio.sleep(0.3)
        os.close(writer)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not [link for link in open_descriptors() if link == str(fifo)]


def open_descriptors() -> list[str]:
    links = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            links.append(os.readlink(entry))
        except OSError:
            pass
    return links


async def test_an_abort_cancelled_while_the_bucket_answers_closes_the_file(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop cancels the abort of an upload while the bucket is slow to answer it: the
    temp file the parts were read from is closed all the same."""
    size = part_size(None) + MiB
    path = blob_file(tmp_path / "temp", size)
    up = BucketUpload(bucket, "cache/blobs/aborted", size, path, lambda _: None, PartBuffers())
    up.progress(size)  # the first part goes up, read from the file
    for _ in range(200):
        if str(path) in open_descriptors():
            break
        await asyncio.sleep(0.025)
    real_abort, asked, ids = bucket.abort_multipart, asyncio.Event(), []

    async def slow_abort(key: str, upload_id: str) -> None:
        ids.append(upload_id)
        asked.set()
        await asyncio.sleep(5)
        await real_abort(key, upload_id)

    monkeypatch.setattr(bucket, "abort_multipart", slow_abort)
    aborting = asyncio.create_task(up.abort())
    await asyncio.wait_for(asked.wait(), 10)
    aborting.cancel()
    await asyncio.gather(aborting, return_exceptions=True)

    assert str(path) not in open_descriptors()
    # The abort itself is left to be done when the bucket answers (or the next start's).
    assert ("cache/blobs/aborted", ids[0]) in bucket._orphans
    await real_abort("cache/blobs/aborted", ids[0])  # not left in the shared bucket
