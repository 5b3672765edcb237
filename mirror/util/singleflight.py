"""One call per key at a time: concurrent callers with the same key share its result.

Two hundred clients asking for one expired tag must cost one upstream HEAD, not two
hundred (each a request against Docker Hub's limits). The call runs in a task of its
own, so a caller that goes away cancels nothing that others wait on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Coalesces concurrent calls that share a key."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task[Any]] = {}

    async def do(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(call())
            self._calls[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        result: T = await asyncio.shield(task)
        return result

    def running(self, key: Hashable) -> Awaitable[Any] | None:
        """The result of the call under `key` while one is under way (shielded: a caller
        that goes away cancels its own wait only), else None."""
        task = self._calls.get(key)
        return None if task is None else asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._calls.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited is not a warning

    async def close(self) -> None:
        for task in list(self._calls.values()):
            task.cancel()
        await asyncio.gather(*self._calls.values(), return_exceptions=True)
