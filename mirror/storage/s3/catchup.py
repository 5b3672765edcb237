"""What the local tier kept and the bucket did not get, sent once the bucket answers again.

While the bucket does not answer no new blob is cached (tiered.py: `writable_now`), but a
download whose upload the bucket cut is still kept locally once verified, and manifests
are written locally all the same. Left there, another replica (or this one, after its
local tier let them go) would find them in no tier and spend an upstream pull again.

The record is this process's memory, bounded: a restart while the bucket is down forgets
it, and those objects reach the bucket at their next miss, as before there was a record.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from mirror.oci.reference import Digest
from mirror.storage.s3.bucket import Bucket, BucketUnavailable
from mirror.storage.s3.keys import Kind
from mirror.storage.s3.upload import BucketUpload, PartBuffers
from mirror.storage.sharing import BucketSharing

log = logging.getLogger(__name__)

# Objects waiting for the bucket, at most; past it the oldest is forgotten (it reaches the
# bucket at its next miss).
MAX_UNSENT = 10_000


class Sent(enum.Enum):
    SENT = enum.auto()
    GONE = enum.auto()  # no longer in the local tier, or already in the bucket
    LATER = enum.auto()  # the bucket stopped answering: kept for its return


class Unsent:
    """Objects to copy from the local tier into the bucket, oldest first."""

    def __init__(
        self,
        bucket: Bucket,
        sharing: BucketSharing,
        buffers: PartBuffers,
        blob_path: Callable[[Digest], Path],
        verified_size: Callable[[Digest], Awaitable[int | None]],
        read_manifest: Callable[[Digest], Awaitable[tuple[str, bytes] | None]],
        stored: Callable[[Digest, int], Awaitable[None]],
    ) -> None:
        self._bucket = bucket
        self._sharing = sharing
        self._buffers = buffers
        self._blob_path = blob_path
        self._verified_size = verified_size
        self._read_manifest = read_manifest
        self._stored = stored
        self._waiting: dict[tuple[Kind, Digest], None] = {}
        self._forgotten = 0
        self._sending = False  # one `send` at a time: it takes what is added meanwhile

    def add(self, kind: Kind, digest: Digest) -> None:
        self._waiting[(kind, digest)] = None
        if len(self._waiting) > MAX_UNSENT:
            del self._waiting[next(iter(self._waiting))]
            self._forgotten += 1

    async def send(self) -> None:
        """Send each waiting object while the bucket answers, one call at a time (the one
        running takes what is added meanwhile); a chore: a failure logged, never raised."""
        if self._sending:
            return
        self._sending = True
        try:
            await self._send_waiting()
        except Exception as exc:  # the next call tries again
            log.warning("objects kept meanwhile not sent to the bucket: %s", type(exc).__name__)
        finally:
            self._sending = False

    async def _send_waiting(self) -> None:
        sent = 0
        while self._waiting and self._bucket.up:
            kind, digest = entry = next(iter(self._waiting))
            try:
                outcome = await self._send(kind, digest)
            except (ClientError, BotoCoreError, OSError) as exc:  # this object's fault
                log.warning("%s %s not sent to the bucket: %s", kind, digest, type(exc).__name__)
                outcome = Sent.GONE
            except BucketUnavailable:
                outcome = Sent.LATER
            if outcome is Sent.LATER:
                break
            del self._waiting[entry]
            sent += outcome is Sent.SENT
        if sent or self._forgotten:
            log.warning(
                "the bucket answers again: %d objects kept meanwhile sent to it, %d left for "
                "their next miss",
                sent,
                self._forgotten,
            )
            self._forgotten = 0

    async def _send(self, kind: Kind, digest: Digest) -> Sent:
        if kind == "manifests":
            return await self._send_manifest(digest)
        return await self._send_blob(digest)

    async def _send_manifest(self, digest: Digest) -> Sent:
        found = await self._read_manifest(digest)
        if found is None:
            return Sent.GONE
        media_type, body = found
        await self._bucket.put(self._bucket.keys.manifest(digest), body, media_type)
        return Sent.SENT

    async def _send_blob(self, digest: Digest) -> Sent:
        """The local file, hashed again first (what replicas read from the bucket is
        trusted as verified), unless the bucket has it by now (another replica's); under
        the blob's lease, as a download's upload, so no replica aborts it as abandoned."""
        async with self._sharing.uploading(str(digest)) as mine:
            key = self._bucket.keys.blob(digest)
            if not mine or await self._bucket.size(key) is not None:
                return Sent.GONE
            size = await self._verified_size(digest)
            if size is None:
                return Sent.GONE
            landed: list[int] = []
            path = self._blob_path(digest)
            upload = BucketUpload(self._bucket, key, size, path, landed.append, self._buffers)
            upload.progress(size)
            await upload.complete()  # a failure is logged and the upload aborted there
        if landed:
            await self._stored(digest, size)
            return Sent.SENT
        # By this upload's own failure: another call may have found the bucket back since.
        return Sent.LATER if upload.bucket_down else Sent.GONE
