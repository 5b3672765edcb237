"""bcrypt on its own small thread pool, with a bounded queue, apart from the file I/O threads.

A bcrypt check costs ~50-250 ms of CPU by design. On asyncio's default executor (the one
`asyncio.to_thread` uses for every file read and write) a flood of logins would queue ahead
of the cache's disk work; here it waits in a queue of its own, and past that queue the
caller is refused at once (`HashPoolFull`) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

WORKERS = 2
QUEUE = 32


class HashPoolFull(Exception):
    """Every worker is busy and the queue is full: the caller should retry later."""


class HashPool:
    """A few threads for password hashing; at most `queue` checks wait for one."""

    def __init__(self, workers: int = WORKERS, queue: int = QUEUE) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="bcrypt")
        self._capacity = workers + queue
        self._admitted = 0

    @property
    def busy(self) -> int:
        """Checks running or waiting."""
        return self._admitted

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """`func(*args)` on a pool thread; HashPoolFull when the queue is full."""
        if self._admitted >= self._capacity:
            raise HashPoolFull()
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        finally:
            self._admitted -= 1

    def close(self) -> None:
        """Stop the threads; checks still queued are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
