"""bcrypt on its own small thread pool, with a bounded queue, apart from the file I/O threads.

A bcrypt check costs ~50-250 ms of CPU by design. On asyncio's default executor (the one
`asyncio.to_thread` uses for every file read and write) a flood of logins would queue ahead
of the cache's disk work; here it waits in a queue of its own, and past that queue the
caller is refused at once (`HashPoolFull`) rather than queued without bound. Once half the
pool is taken, a client address holding its share already is refused too: one address
sending many logins at once cannot take every place from the others.
"""

from __future__ import annotations

import asyncio
from collections import Counter
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
        # An owner's places once half the pool is taken: two owners' shares fill that half.
        self._share = max(1, self._capacity // 4)
        self._admitted = 0
        self._held: Counter[str] = Counter()

    @property
    def busy(self) -> int:
        """Checks running or waiting."""
        return self._admitted

    async def run(self, func: Callable[..., T], *args: object, owner: str = "") -> T:
        """`func(*args)` on a pool thread; HashPoolFull when the queue is full, or when
        half of it is and `owner` (a client address) holds its share already."""
        if self._admitted >= self._capacity or self._over_share(owner):
            raise HashPoolFull()
        self._admitted += 1
        self._held[owner] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        finally:
            self._admitted -= 1
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]

    def _over_share(self, owner: str) -> bool:
        return self._admitted * 2 >= self._capacity and self._held[owner] >= self._share

    def close(self) -> None:
        """Stop the threads; checks still queued are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
