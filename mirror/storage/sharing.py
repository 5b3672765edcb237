"""What a bucket shared with other processes asks of them: whose chore, whose upload, who reads.

`TieredStorage` receives one when it is built: `Alone` unless the mirror is a replica, whose
answers come from its leases (mirror/cluster/bucketshare.py, wired in `create_app`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class BucketSharing(Protocol):
    """The bucket's chores among the processes that share it."""

    @property
    def owners_known(self) -> bool:
        """Does `upload_live` know every live upload (replicas hold a lease for each)?
        Then any other is abandoned, however young."""

    def exclusive(self) -> AbstractAsyncContextManager[bool]:
        """Yields whether this process may run a bucket eviction pass now."""

    async def upload_live(self, digest: str) -> bool:
        """Is the multipart upload of the blob `digest` another process's live one?"""

    def uploading(self, digest: str) -> AbstractAsyncContextManager[bool]:
        """Yields whether this process may upload the blob `digest` now, marked live for
        the others while it does (False: another process downloads and uploads it)."""

    async def begin_read(self, digest: str) -> None:
        """This process starts streaming the object of `digest` from the bucket."""

    async def end_read(self, digest: str, grace: float) -> None:
        """... and ended a stream of it: the others leave it `grace` seconds more."""

    async def read_elsewhere(self, digest: str) -> bool:
        """May a process be reading the object of `digest` (or have read it within its
        grace)? True when that cannot be told: an eviction pass then leaves it."""

    async def close(self) -> None:
        """Stop what runs for the reads (before the leases' Redis is closed)."""


class Alone:
    """No other process known: every eviction pass is ours, no upload is known to be live
    (so one is taken as abandoned only once old: a `mirror ls` may run beside a serve), and
    this process's own streams are known to its eviction already (`TieredStorage.reading`)."""

    owners_known = False

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        yield True

    async def upload_live(self, digest: str) -> bool:
        return False

    @contextlib.asynccontextmanager
    async def uploading(self, digest: str) -> AsyncIterator[bool]:
        yield True

    async def begin_read(self, digest: str) -> None:
        pass

    async def end_read(self, digest: str, grace: float) -> None:
        pass

    async def read_elsewhere(self, digest: str) -> bool:
        return False

    async def close(self) -> None:
        pass
