"""Work a thread does, awaited to its end however its task is cancelled (util/settle.py):
the thread cannot be stopped, and a caller that goes on to close what it uses must not."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mirror.util.settle import in_thread, in_threads, wait_out


async def test_a_thread_call_cancelled_twice_is_still_waited_for() -> None:
    release, ended = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(5)
        ended.set()

    task = asyncio.create_task(in_thread(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # the thread still runs: so does the awaiting task
    release.set()
    await asyncio.gather(task, return_exceptions=True)
    assert ended.is_set() and task.cancelled()


async def test_a_queued_thread_call_cancelled_still_runs() -> None:
    """A call waiting for a free thread when its task is cancelled: `to_thread` would drop
    it (a lock release never run); this runs it."""
    release = threading.Event()
    ran: list[int] = []
    blockers = [asyncio.create_task(in_thread(lambda: release.wait(5))) for _ in range(40)]
    queued = asyncio.create_task(in_thread(lambda: ran.append(1)))
    await asyncio.sleep(0.05)
    queued.cancel()
    release.set()
    await asyncio.gather(queued, *blockers, return_exceptions=True)
    assert ran == [1]


async def test_calls_side_by_side_give_their_results_in_order() -> None:
    assert await in_threads(lambda: 1, lambda: 2) == [1, 2]
    with pytest.raises(ValueError, match="first"):
        await in_threads(lambda: 0, _raises("first"), _raises("second"))


async def test_wait_out_leaves_the_futures_alone() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(wait_out(future))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0.01)
    assert not future.cancelled() and not waiter.done()
    future.set_result(3)
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled() and future.result() == 3


def _raises(message: str) -> object:
    def call() -> None:
        raise ValueError(message)

    return call
