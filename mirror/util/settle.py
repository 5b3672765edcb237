"""Waiting for work that cannot be stopped: a call running in a thread.

Cancelling the task that awaits a thread does not stop the thread. A task that then goes
on to close the descriptor the thread writes to (or delete its file) races it: the number
may already name the next file opened, which gets the bytes. Work a thread does is awaited
here to its end, a cancellation received meanwhile raised only after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_out(*futures: asyncio.Future[Any]) -> None:
    """Return once every one of `futures` is done, however often this is cancelled meanwhile
    (none of them is cancelled); then raise CancelledError if this was. Their results and
    errors are left for the caller."""
    cancelled = False
    pending = {future for future in futures if not future.done()}
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Each call in a thread of the default executor, side by side; their results in order
    once all are done (the first call's error, in order, if one failed). Cancelled meanwhile,
    it still returns only after every call ended (`wait_out`)."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(None, call) for call in calls]
    try:
        await wait_out(*futures)
    finally:
        errors = [future.exception() for future in futures]  # all seen, one raised
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


async def in_thread(call: Callable[[], T]) -> T:
    """`call()` in a thread; cancelled meanwhile, it returns only after the call ended."""
    (result,) = await in_threads(call)
    return result  # type: ignore[no-any-return]


async def settled(task: asyncio.Future[Any]) -> None:
    """`wait_out(task)`, its outcome then taken as seen: for a `finally` that lets work
    settle on the way out of an error (or a cancellation) that says more."""
    try:
        await wait_out(task)
    finally:
        if task.done() and not task.cancelled():
            task.exception()
