"""A mirror stopped while its threads work: what a thread still does is waited for before
what it uses is closed or removed, and nothing it made is left behind (cache/downloads.py,
storage/hostshare.py, util/settle.py). The sleeps stand in for a slow disk."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.cache import downloads
from mirror.config import Config, StorageConfig
from mirror.config.s3 import S3Config
from mirror.storage import hostshare, localflight
from mirror.storage.tiered import TieredStorage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rgw import CephRGW
from tests.test_s3 import key, local_blob
from tests.test_s3_parts import open_descriptors

MiB = 1024 * 1024


def open_under(directory: Path) -> list[str]:
    """This process's descriptors on files under `directory`."""
    return [link for link in open_descriptors() if link.startswith(str(directory))]


async def start_download(
    make_client: MakeClient, hub: FakeHub, cdn_delay: float = 0.02, **changes: Any
) -> tuple[Any, Any]:
    """A mirror with a cold 8 MiB blob download under way (the CDN slowed)."""
    client = await make_client(**changes)
    hub.cdn_delay = cdn_delay
    digest = hub.content.add_blob(os.urandom(8 * MiB), "library/app")
    get = asyncio.create_task(client.get(f"/v2/library/app/blobs/{digest}"))
    return client, get


async def stop(client: Any, get: asyncio.Task[Any]) -> None:
    get.cancel()  # the client leaves; the download goes on
    await asyncio.gather(get, return_exceptions=True)
    await client.close()  # the app's cleanup cancels the download


async def test_a_stop_waits_for_the_write_in_flight_before_the_temp_file_is_closed(
    make_client: MakeClient, hub: FakeHub, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while a write's thread runs, the download closed the descriptor under it:
    the number could name the next file opened, which then got the blob's bytes."""
    real_write, writing, entered = downloads._write_all, [0], threading.Event()

    def slow_write(fd: int, data: bytes, *rest: Any) -> None:
        writing[0] += 1
        entered.set()
        time.sleep(0.5)
        try:
            real_write(fd, data, *rest)
        finally:
            writing[0] -= 1

    monkeypatch.setattr(downloads, "_write_all", slow_write)
    # The body as fast as it comes: the download waits on its write, where a stop finds it.
    client, get = await start_download(make_client, hub, cdn_delay=0.0)
    await asyncio.to_thread(entered.wait, 10)
    await asyncio.sleep(0.1)

    await stop(client, get)

    assert writing[0] == 0  # no write still under way once the mirror stopped
    assert list((config.storage.path / "tmp").glob("blob-*")) == []


async def test_a_stop_while_workers_are_told_of_a_download_leaves_no_temp_file(
    make_client: MakeClient, hub: FakeHub, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With workers, a new download is told to the others (its claim) right after its temp
    file is made: a stop then left the file, its space reserved, and its descriptor open."""
    real_start, entered = localflight.Claim.start, threading.Event()

    def slow_start(self: localflight.Claim, *args: Any) -> None:
        entered.set()
        time.sleep(0.5)
        real_start(self, *args)

    monkeypatch.setattr(localflight.Claim, "start", slow_start)
    client, get = await start_download(make_client, hub, workers=2)
    await asyncio.to_thread(entered.wait, 10)

    await stop(client, get)

    tmp = config.storage.path / "tmp"
    assert list(tmp.glob("blob-*")) == []
    assert open_under(tmp) == []


async def test_a_stream_cancelled_while_its_read_is_marked_leaves_the_others_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two streams of one bucket object begin together; the one whose thread takes the
    read lock is cancelled: the other's read stays marked (another worker's eviction
    leaves the object), and ending it lets the mark go."""
    real_lock, entered = hostshare._lock_read, threading.Event()

    def slow_lock(path: Path) -> int:
        entered.set()
        time.sleep(0.3)
        return real_lock(path)

    monkeypatch.setattr(hostshare, "_lock_read", slow_lock)
    share, digest = hostshare.HostShare(tmp_path), "sha256:" + "a" * 64
    first = asyncio.create_task(share.begin_read(digest))
    await asyncio.to_thread(entered.wait, 5)
    second = asyncio.create_task(share.begin_read(digest))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await share.end_read(digest, 0.0)  # as the cancelled stream's caller does
    await second

    await asyncio.sleep(0.05)  # past the grace of 0 the cancelled one's end could start
    assert await share.read_elsewhere(digest)
    await share.end_read(digest, 0.0)
    await asyncio.sleep(0.05)
    assert not await share.read_elsewhere(digest)
    await share.close()


async def test_a_stop_lets_the_cancelled_downloads_abort_their_uploads(
    make_client: MakeClient,
    hub: FakeHub,
    tmp_path: Path,
    s3: S3Config,
    rgw: CephRGW,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop lets a verified download finish, then cancelled every download again: one
    still aborting its multipart upload (cancelled the first time) was cut, and the upload
    stayed in the bucket, its parts kept, until an abandoned-upload sweep."""
    client = await make_client(storage=StorageConfig(path=tmp_path / "data", s3=s3))
    storage = client.app[storage_key]
    assert isinstance(storage, TieredStorage)
    hub.cdn_delay = 0.002
    cut = hub.content.add_blob(os.urandom(24 * MiB), "library/app")
    cutting = asyncio.create_task(client.get(f"/v2/library/app/blobs/{cut}"))
    for _ in range(400):  # its first part is up: a multipart upload exists
        if rgw.s3().multipart_uploads(s3.bucket):
            break
        await asyncio.sleep(0.025)

    real_commit, committing = storage.commit, threading.Event()

    def slow_commit(*args: Any) -> None:
        committing.set()
        time.sleep(0.5)
        real_commit(*args)

    real_abort = storage.bucket.abort_multipart

    async def slow_abort(key: str, upload_id: str) -> None:
        await asyncio.sleep(1.0)  # past the verified download's finish
        await real_abort(key, upload_id)

    monkeypatch.setattr(storage, "commit", slow_commit)
    monkeypatch.setattr(storage.bucket, "abort_multipart", slow_abort)
    hub.cdn_delay = 0.05  # the first one crawls on until the stop
    whole = hub.content.add_blob(os.urandom(64 * 1024), "library/app")
    finishing = asyncio.create_task(client.get(f"/v2/library/app/blobs/{whole}"))
    await asyncio.to_thread(committing.wait, 10)  # verified, being kept

    for task in (cutting, finishing):
        task.cancel()
    await asyncio.gather(cutting, finishing, return_exceptions=True)
    await client.close()

    assert rgw.s3().multipart_uploads(s3.bucket) == []
    assert key("blobs", whole) in rgw.s3().keys(s3.bucket)


async def test_a_read_mark_that_could_not_be_taken_is_tried_again_by_the_next_stream(
    tmp_path: Path,
) -> None:
    share, digest = hostshare.HostShare(tmp_path), "sha256:" + "c" * 64
    (tmp_path / hostshare.READS).write_text("not a directory")  # the lock cannot be taken
    await share.begin_read(digest)
    (tmp_path / hostshare.READS).unlink()  # the fault gone

    await share.begin_read(digest)  # a stream overlapping the first

    assert await share.read_elsewhere(digest)
    await share.end_read(digest, 0.0)
    await share.end_read(digest, 0.0)
    await share.close()


async def test_a_claim_poll_cancelled_returns_only_once_its_thread_did() -> None:
    """What closes the lock file's descriptor next must not race the poll still using it."""
    release, polled = threading.Event(), threading.Event()

    def poll() -> None:
        release.wait(5)
        polled.set()

    task = asyncio.create_task(localflight.held_off_loop(poll))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    release.set()
    await asyncio.gather(task, return_exceptions=True)
    assert polled.is_set() and task.cancelled()


async def test_a_stop_during_a_verified_blobs_commit_keeps_the_blob(
    make_client: MakeClient, hub: FakeHub, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the stop's grace a download whose commit (fsync, rename) still ran was
    cancelled, and its cleanup removed the temp file under the rename: the verified blob
    lost, fetched again after the restart."""
    monkeypatch.setattr(downloads, "FINISH_ON_CLOSE", 0.1)
    client = await make_client()
    storage = client.app[storage_key]
    real_commit, committing = storage.commit, threading.Event()

    def slow_commit(*args: Any) -> None:
        committing.set()
        time.sleep(0.5)
        real_commit(*args)

    monkeypatch.setattr(storage, "commit", slow_commit)
    digest = hub.content.add_blob(os.urandom(MiB), "library/app")
    get = asyncio.create_task(client.get(f"/v2/library/app/blobs/{digest}"))
    await asyncio.to_thread(committing.wait, 10)

    await stop(client, get)

    assert local_blob(config.storage.path, digest).exists()
