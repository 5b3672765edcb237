"""Files opened and closed in a worker thread, for a coroutine that must not block its loop.

A task cancelled while its thread opens (or creates) a file does not stop the thread: the
file is opened all the same, and dropped unclosed (a descriptor held until the garbage
collector finds it, a temp file left in tmp/). The loop's teardown cancels every leftover
task, so this happens on each shutdown that interrupts a read, not only in rare races.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import BinaryIO, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=BinaryIO)


async def owned_off_loop(make: Callable[[], T], discard: Callable[[T], None]) -> T:
    """`make()` run in the default executor; the caller owns what it returns. Cancelled
    meanwhile, what the thread still makes is handed to `discard` (in a thread) when it
    arrives."""
    loop = asyncio.get_running_loop()
    # A plain future, not a task: a cancelled task would drop what its thread made.
    making = loop.run_in_executor(None, make)
    try:
        return await asyncio.shield(making)
    except asyncio.CancelledError:
        making.add_done_callback(lambda done: _discard(loop, done, discard))
        raise


async def open_off_loop(opener: Callable[[], F]) -> F:
    """`opener()` in a thread; the caller closes the file. See `owned_off_loop`."""
    return await owned_off_loop(opener, _close)


async def close_off_loop(file: BinaryIO) -> None:
    """Close off the loop; cancelled meanwhile, close here rather than leak the file."""
    try:
        await asyncio.to_thread(file.close)
    except asyncio.CancelledError:
        file.close()
        raise


def _close(file: BinaryIO) -> None:
    file.close()


def _discard(
    loop: asyncio.AbstractEventLoop, done: asyncio.Future[T], discard: Callable[[T], None]
) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    made = done.result()
    try:
        loop.run_in_executor(None, _quietly, discard, made)
    except RuntimeError:  # the executor is shut down: the loop is ending anyway
        _quietly(discard, made)


def _quietly(discard: Callable[[T], None], made: T) -> None:
    with contextlib.suppress(OSError):
        discard(made)
