"""Files opened in a worker thread by a task that is cancelled meanwhile (util/threadfiles.py):
what the thread still opens is closed, not dropped for the garbage collector."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import BinaryIO

from mirror.util.threadfiles import close_off_loop, open_off_loop, owned_off_loop


async def test_a_file_opened_for_a_cancelled_task_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"bytes")
    entered, release = threading.Event(), threading.Event()
    opened: list[BinaryIO] = []

    def slow_open() -> BinaryIO:
        entered.set()
        release.wait(5)
        file = open(path, "rb")  # noqa: SIM115 (the test checks who closes it)
        opened.append(file)
        return file

    task = asyncio.create_task(open_off_loop(slow_open))
    await asyncio.to_thread(entered.wait, 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    release.set()
    for _ in range(200):
        if opened and opened[0].closed:
            break
        await asyncio.sleep(0.01)
    assert opened and opened[0].closed


async def test_what_a_cancelled_task_made_is_discarded_in_a_thread(tmp_path: Path) -> None:
    release = threading.Event()
    discarded: list[tuple[int, str]] = []

    def make() -> int:
        release.wait(5)
        return 7

    def discard(made: int) -> None:
        discarded.append((made, threading.current_thread().name))

    task = asyncio.create_task(owned_off_loop(make, discard))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    release.set()
    for _ in range(200):
        if discarded:
            break
        await asyncio.sleep(0.01)
    assert discarded and discarded[0][0] == 7
    assert discarded[0][1] != threading.main_thread().name


async def test_a_file_opened_for_a_task_that_waits_is_its_own(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"bytes")
    file = await open_off_loop(lambda: open(path, "rb"))  # noqa: SIM115
    assert file.read() == b"bytes"
    await close_off_loop(file)
    assert file.closed
