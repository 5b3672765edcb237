"""The single node's metadata snapshot: whole after concurrent writers and a shutdown that
cancels a save in the middle of its write."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest

from mirror.metadata import memory
from mirror.metadata.memory import MemoryMetadata
from mirror.metadata.store import TagRecord
from mirror.util.files import write_replacing

DIGEST = "sha256:" + "a" * 64
MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


def test_writers_at_once_leave_a_whole_snapshot_and_no_temp_file(tmp_path: Path) -> None:
    """Two writers of the same snapshot (the serve's saver and a CLI command beside it, or
    a cancelled save and the final one) shared one temp name: their bytes mixed, and the
    next start ignored the file (every tag record and holding gone)."""
    path = tmp_path / "metadata.json"
    texts = [json.dumps({"writer": n, "pad": "x" * (n * 50_000)}) for n in range(1, 5)]
    for _ in range(40):
        threads = [
            threading.Thread(target=write_replacing, args=(path, text), kwargs={"durable": True})
            for text in texts
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]


async def test_a_save_cancelled_mid_write_then_close_leaves_the_newest_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown the periodic saver is cancelled, its write maybe still running in its
    thread; the final save must not race it, and what it writes must be the newest."""
    path = tmp_path / "metadata.json"
    store = MemoryMetadata(60, snapshot=path)
    slow = threading.Event()

    def slow_write(target: Path, text: str, *, durable: bool = False) -> os.stat_result:
        if not slow.is_set():  # the first write lingers past its save's cancellation
            slow.set()
            time.sleep(0.3)
        return write_replacing(target, text, durable=durable)

    monkeypatch.setattr(memory, "write_replacing", slow_write)
    record = TagRecord(DIGEST, MEDIA_TYPE, 100, time.time())
    await store.put_tag("docker.io", "library/a", "1", record)
    saver = asyncio.create_task(store.save())
    await asyncio.to_thread(slow.wait)
    saver.cancel()
    await asyncio.gather(saver, return_exceptions=True)
    await store.put_tag("docker.io", "library/b", "1", record)  # after the first write began
    await store.close()
    await asyncio.sleep(0.5)  # a write still running after close has landed by now
    again = MemoryMetadata(60, snapshot=path)
    await again.load()
    assert await again.get_tag("docker.io", "library/a", "1") == record
    assert await again.get_tag("docker.io", "library/b", "1") == record


async def test_a_snapshot_is_built_off_the_event_loop_and_drops_what_retention_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built on the loop, 100,000 tags held every request up 1.7 s every 30 s: the JSON is
    made in the writer's thread, from a copy. Holdings past their retention are left out of
    it and forgotten, unless recorded again meanwhile."""
    built_on: list[threading.Thread] = []
    dumps = json.dumps

    def recording(data: object) -> str:
        built_on.append(threading.current_thread())
        return dumps(data)

    monkeypatch.setattr(memory.json, "dumps", recording)
    path = tmp_path / "metadata.json"
    store = MemoryMetadata(60, snapshot=path)
    record = TagRecord(DIGEST, MEDIA_TYPE, 100, time.time())
    await store.put_tag("docker.io", "library/a", "1", record)
    long_ago = time.time() - 10**7  # retention long over
    await store.add_holdings("docker.io", "library/a", ["sha256:" + "1" * 64], long_ago)
    await store.add_holdings("docker.io", "library/b", ["sha256:" + "2" * 64], time.time())
    await store.save()
    assert built_on and threading.main_thread() not in built_on
    saved = json.loads(path.read_text())
    assert [(h["repo"], list(h["digests"])) for h in saved["holdings"]] == [
        ("library/b", ["sha256:" + "2" * 64])
    ]
    assert ("docker.io", "library/a") not in store._holdings  # forgotten: memory bounded
    assert await store.holds("docker.io", "library/b", "sha256:" + "2" * 64)


async def test_a_save_removes_the_temp_files_a_killed_save_left(tmp_path: Path) -> None:
    """A process killed while it wrote the snapshot leaves its temp file beside it; the next
    save removes those old enough to be no live save's."""
    path = tmp_path / "metadata.json"
    left = [tmp_path / f".metadata.json.{name}.tmp" for name in ("k1ll3d_a", "k1ll3d_b")]
    live = tmp_path / ".metadata.json.wr1t1ng.tmp"
    other = tmp_path / ".other.json.k1ll3d_c.tmp"
    old = time.time() - memory.STALE_TEMP - 1
    for temp in [*left, live, other]:
        temp.write_text("{")
        if temp is not live:
            os.utime(temp, (old, old))
    store = MemoryMetadata(60, snapshot=path)
    await store.put_tag(
        "docker.io", "library/a", "1", TagRecord(DIGEST, MEDIA_TYPE, 1, time.time())
    )
    await store.save()
    await store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["metadata.json", "metadata.json.lock", live.name, other.name]
    )


def record_at(checked_at: float, digest: str = DIGEST) -> TagRecord:
    return TagRecord(digest, MEDIA_TYPE, 100, checked_at)


async def test_a_save_keeps_what_another_process_saved_meanwhile(tmp_path: Path) -> None:
    """`mirror warm` beside a live serve: both keep in-process metadata in this file, and
    the serve's next save rewrote it from its memory alone, dropping the warmed tags (a
    restart with the upstream down then had nothing for them)."""
    path = tmp_path / "metadata.json"
    now = time.time()
    serve = MemoryMetadata(60, snapshot=path)
    await serve.load()
    await serve.put_tag("docker.io", "library/mine", "1", record_at(now))
    await serve.put_tag("docker.io", "library/both", "1", record_at(now - 10))
    await serve.put_blob_read("sha256:" + "e" * 64, 5, now - 10)
    await serve.save()
    await serve.forget_blob("sha256:" + "e" * 64)  # evicted here since

    warm = MemoryMetadata(60, snapshot=path)  # another process: loads the file, writes it
    await warm.load()
    await warm.put_tag("docker.io", "library/warmed", "1", record_at(now))
    await warm.put_tag("docker.io", "library/both", "1", record_at(now - 5, "sha256:" + "b" * 64))
    await warm.add_repository("library/warmed")
    await warm.add_holdings("docker.io", "library/warmed", ["sha256:" + "c" * 64], now)
    await warm.close()

    await serve.put_tag("docker.io", "library/mine", "2", record_at(now))
    await serve.close()
    after = MemoryMetadata(60, snapshot=path)
    await after.load()
    assert await after.get_tag("docker.io", "library/warmed", "1") == record_at(now)
    assert await after.get_tag("docker.io", "library/mine", "2") == record_at(now)
    # The newer record of a tag both wrote wins, whichever saved last.
    assert (await after.get_tag("docker.io", "library/both", "1")) == record_at(
        now - 5, "sha256:" + "b" * 64
    )
    assert await after.repositories(10, None) == ["library/warmed"]
    assert await after.holds("docker.io", "library/warmed", "sha256:" + "c" * 64)
    assert await after.blob_reads() == {}  # what the serve evicted stays gone
    # The serve took the warmed records in, and answers them without a restart too.
    assert await serve.get_tag("docker.io", "library/warmed", "1") == record_at(now)


async def test_saves_of_two_processes_take_turns(tmp_path: Path) -> None:
    """A save that read the file just before another process replaced it wrote what it
    read back over that process's records. Here the other process holds the snapshot's
    lock while it writes (its own save's turn), so the save waits, then takes its records in."""
    path = tmp_path / "metadata.json"
    now = time.time()
    serve = MemoryMetadata(60, snapshot=path)
    await serve.put_tag("docker.io", "library/mine", "1", record_at(now))

    warm = MemoryMetadata(60, snapshot=tmp_path / "warm.json")
    await warm.put_tag("docker.io", "library/warmed", "1", record_at(now))
    await warm.save()

    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the other process's turn: its read, its write
    try:
        saving = asyncio.create_task(serve.save())
        await asyncio.sleep(0.3)
        os.replace(tmp_path / "warm.json", path)  # its write lands
    finally:
        os.close(lock)
    await asyncio.wait_for(saving, 10)

    after = MemoryMetadata(60, snapshot=path)
    await after.load()
    assert await after.get_tag("docker.io", "library/warmed", "1") == record_at(now)
    assert await after.get_tag("docker.io", "library/mine", "1") == record_at(now)


async def test_a_save_cancelled_while_it_waits_for_its_turn_leaves_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metadata.json"
    store = MemoryMetadata(60, snapshot=path)
    await store.put_tag("docker.io", "library/mine", "1", record_at(time.time()))
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    saving = asyncio.create_task(store.save())
    await asyncio.sleep(0.1)
    saving.cancel()
    os.close(lock)  # the waiting thread gets the lock now, and must give it back
    with pytest.raises(asyncio.CancelledError):
        await saving
    await asyncio.wait_for(store.close(), 10)  # its own next save is not locked out
    assert path.exists()


async def test_entries_this_release_cannot_read_are_skipped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One record the loader could not build (a field from a later release, or one gone)
    made it drop the whole file: a start after a rollback had no tag records or holdings,
    and its next save wrote that emptiness over the file."""
    path = tmp_path / "metadata.json"
    now = time.time()
    store = MemoryMetadata(60, snapshot=path)
    for name in ("newer", "broken", "plain"):
        await store.put_tag("docker.io", f"library/{name}", "1", record_at(now))
    await store.add_repository("library/plain")
    await store.add_holdings("docker.io", "library/plain", [DIGEST], now)
    await store.close()
    data = json.loads(path.read_text())
    records = {entry["repo"]: entry["record"] for entry in data["tags"]}
    records["library/newer"].update(v=2, annotations={"a": "b"})  # as a later release writes
    del records["library/broken"]["size"]
    path.write_text(json.dumps(data))

    again = MemoryMetadata(60, snapshot=path)
    await again.load()
    await again.put_tag("docker.io", "library/after", "1", record_at(now))
    await again.close()
    after = MemoryMetadata(60, snapshot=path)
    await after.load()
    for store in (again, after):  # what was read, and what the next save wrote
        assert await store.get_tag("docker.io", "library/newer", "1") == record_at(now)
        assert await store.get_tag("docker.io", "library/plain", "1") == record_at(now)
        assert await store.get_tag("docker.io", "library/broken", "1") is None
        assert await store.holds("docker.io", "library/plain", DIGEST)
        assert await store.repositories(10, None) == ["library/plain"]
    assert await after.get_tag("docker.io", "library/after", "1") == record_at(now)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"metadata snapshot {path}: skipped 1 entries this release cannot read"]


@pytest.mark.parametrize("text", ['{"tags": [{"upstream": "docker.io", "re', '{"records": []}'])
@pytest.mark.parametrize("found_by", ["load", "save"])
async def test_a_snapshot_that_cannot_be_read_is_set_aside_not_written_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, found_by: str
) -> None:
    """An unreadable snapshot (torn, or of another format) was ignored and the next save
    wrote over it: nothing was left to recover its records from. Found at the start, or by
    a save taking in what another process wrote there."""
    path = tmp_path / "metadata.json"
    store = MemoryMetadata(60, snapshot=path)
    if found_by == "load":
        path.write_text(text)
    await store.load()
    if found_by == "save":
        path.write_text(text)
    await store.put_tag("docker.io", "library/a", "1", record_at(time.time()))
    await store.close()
    [aside] = tmp_path.glob("metadata.json.bad-*")
    assert aside.read_text() == text
    moved = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    assert len(moved) == 1 and moved[0].endswith(f"moved to {aside}")
    assert len(json.loads(path.read_text())["tags"]) == 1  # its own records, saved beside


async def test_only_the_newest_unreadable_snapshots_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    for n in range(memory.BAD_KEPT + 2):
        path.write_text(f"torn {n}")
        await MemoryMetadata(60, snapshot=path).load()
    kept = sorted(tmp_path.glob("metadata.json.bad-*"))
    assert [p.read_text() for p in kept] == [f"torn {n}" for n in range(2, memory.BAD_KEPT + 2)]
