"""What a bucket shared with other processes asks of them: whose chore, whose upload.

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


class Alone:
    """No other process known: every eviction pass is ours, no upload is known to be live
    (so one is taken as abandoned only once old: a `mirror ls` may run beside a serve)."""

    owners_known = False

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        yield True

    async def upload_live(self, digest: str) -> bool:
        return False
