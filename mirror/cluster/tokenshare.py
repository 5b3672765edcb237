"""One upstream token per scope across the processes (or replicas) of one mirror.

A process that needs a token it has not cached asks the shared store first (SQLite for
workers alone, else Redis): a token another process fetched is used until shortly before
it expires. If none is there, the fetch runs under the lease `token:<key>`, so that of the
processes wanting one scope at once, one asks the token service and the others read its
token from the store (cluster/shared.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable

from mirror.cluster.shared import SharedWork
from mirror.metadata.store import TokenStore
from mirror.metadata.topology import DOWN_ERRORS

# A shared token with less than this left is not taken: fetch a fresh one instead (the
# fetcher already cached it only until EXPIRY_MARGIN before the upstream's expiry).
MIN_LEFT = 5.0
# A store that fails costs a duplicate fetch, never a failed pull.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, *DOWN_ERRORS)

Fetch = Callable[[], Awaitable[tuple[str, float]]]


class SharedTokens:
    """`TokenShare` (upstream/tokens.py) over a token store and leases."""

    def __init__(self, store: TokenStore, work: SharedWork) -> None:
        self._store = store
        self._work = work

    async def once(self, key: str, fetch: Fetch) -> tuple[str, float]:
        """(token, seconds to keep it) under `key`: another process's, or `fetch()`'s."""
        found = await self._stored(key)
        if found is not None:
            return found
        return await self._work.once(
            "token", f"token:{key}", lambda: self._stored(key), lambda: self._fetch(key, fetch)
        )

    async def _stored(self, key: str) -> tuple[str, float] | None:
        with contextlib.suppress(*STORE_ERRORS):
            found = await self._store.get_token(key)
            if found is not None and found[1] - time.time() > MIN_LEFT:
                return found[0], found[1] - time.time()
        return None

    async def _fetch(self, key: str, fetch: Fetch) -> tuple[str, float]:
        token, ttl = await fetch()
        with contextlib.suppress(*STORE_ERRORS):
            await self._store.put_token(key, token, time.time() + ttl)
        return token, ttl
