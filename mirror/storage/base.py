"""What the services above need from the cache, whichever backend holds it.

Both backends keep a directory (`storage.path`): the whole cache for `Storage`, the local
tier and the downloads in progress for `TieredStorage`, which puts a bucket behind it. So
the write path is the same for both (a temp file, hashed, renamed under its digest); a
bucket adds an `Upload` that follows the temp file, and `find_blob` answers a local miss.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from mirror.metadata.store import MetadataStore
from mirror.oci.reference import Digest

# Write errors that say this file did not fit, not that the disk takes no writes at all.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# Evicting down to 90% of a bound leaves room, so that each new blob does not set off
# another pass (a scan of the whole cache directory, or of the bucket's records).
LOW_WATER = 0.9
# A pass runs at least this often, new blobs or not (idle blobs, other replicas' uploads).
SCAN_INTERVAL = 300.0


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """What one eviction pass did (of the cache directory, or of the bucket)."""

    evicted: int
    freed: int
    remaining: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What `verify` did: files and objects re-hashed, the corrupt ones removed, and, when
    the bucket failed, one line saying what was not verified."""

    checked: int
    removed: list[str]
    unverified: str | None = None


class NotTidied(Exception):
    """`collect_garbage` could not do its part beyond the local directory (the bucket does
    not answer): the message says why."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the client elsewhere for the bytes (a presigned URL of the bucket)."""

    url: str


@dataclass(frozen=True, slots=True)
class BlobSize:
    """The blob is stored, this large (the answer to a HEAD: no body moved)."""

    size: int


class BlobStream(Protocol):
    """A stored blob's bytes (or the asked range of them), coming from elsewhere."""

    status: int  # 200, or 206 for a range
    length: int  # bytes in this body
    content_range: str | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


@runtime_checkable
class SpooledBlob(Protocol):
    """A stored blob's whole body landing in a local file as it comes from elsewhere: sent
    from that file span by span (sendfile) as the bytes arrive."""

    status: int  # 200
    length: int
    content_range: str | None  # None

    @property
    def file(self) -> BinaryIO: ...

    def spans(self) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) spans of `file` to send, as they arrive; StoreReadError when
        the bytes stop coming or do not match the digest."""

    async def close(self) -> None: ...


Found = Redirect | BlobSize | SpooledBlob | BlobStream


class StoreReadError(Exception):
    """A stored blob's bytes stopped coming (the body sent so far must be cut short)."""


class RangeOutsideBlob(Exception):
    """The range asked of `find_blob` starts past the end of the stored blob."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range outside a blob of {size} bytes")
        self.size = size


class Upload(Protocol):
    """A copy of a download's temp file on its way to a second home (the bucket)."""

    def progress(self, written: int) -> None:
        """`written` bytes of the temp file are on disk."""

    async def complete(self) -> None:
        """The bytes are verified: make the copy visible (never raises)."""

    async def abort(self) -> None:
        """The download failed: leave nothing behind (never raises)."""


class CacheStore(Protocol):
    """Content by digest: a local directory, optionally in front of a bucket."""

    max_size: int | None
    writable: bool
    on_writable_change: Callable[[bool], None] | None
    shared: bool  # other processes serve from the same directory (workers)
    offline: bool  # a one-shot command: it may run beside a live serve, and cleans nothing
    on_landed: Callable[[int], None] | None  # a blob the store put in the directory itself
    on_emptied: Callable[[], None] | None  # the layout made again: the directory was emptied

    @property
    def root(self) -> Path: ...

    @property
    def tmp(self) -> Path: ...

    @property
    def blobs(self) -> Path: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def attach(self, metadata: MetadataStore, busy: Callable[[], Iterable[object]]) -> None:
        """Start the store's own bookkeeping (it runs until `close`). `metadata` answers
        even while Redis is down (`FallbackMetadata`): its errors are not the store's."""

    def fits(self, size: int | None) -> bool: ...

    def mark_unwritable(self, exc: OSError) -> None: ...

    async def writable_now(self) -> bool: ...

    async def is_writable(self) -> bool: ...

    async def health(self) -> dict[str, str]:
        """Checks for /readyz beyond the local directory's: name → "ok" or why not."""

    def blob_path(self, digest: Digest) -> Path: ...

    def open_blob(self, digest: Digest) -> BinaryIO:
        """The blob in the local directory, open for reading (blocking; the caller
        closes it); FileNotFoundError if not there. No eviction removes it while open."""

    def open_reading(self, path: Path) -> BinaryIO:
        """A blob's file, cached or in tmp/, open as `open_blob` opens one (blocking)."""

    @staticmethod
    def walk(top: Path) -> Iterator[tuple[str, str]]: ...

    async def blob_size(self, digest: Digest) -> int | None:
        """Size of the blob in the local directory (marking it read), or None."""

    async def find_blob(
        self, digest: Digest, byte_range: str | None, *, head: bool
    ) -> Found | None:
        """After a local miss: where else the blob is, or None (then: upstream);
        RangeOutsideBlob when `byte_range` lies past its end."""

    async def contains(self, digest: Digest) -> bool:
        """Is the blob stored anywhere (a warm needs no fetch)?"""

    def new_temp(self, size: int | None = None, reserve: int | None = None) -> tuple[int, Path]: ...

    def reserve(self, fd: int, temp: Path, start: int, length: int) -> None: ...

    def start_upload(self, digest: Digest, size: int | None, temp: Path) -> Upload: ...

    def commit(self, fd: int, temp: Path, final: Path) -> None: ...

    def discard(self, fd: int | None, temp: Path | None) -> None: ...

    async def read_manifest(self, digest: Digest) -> tuple[str, bytes] | None: ...

    async def write_manifest(self, digest: Digest, media_type: str, body: bytes) -> bool: ...

    async def usage(self) -> tuple[int, int]: ...

    async def disk_space(self) -> tuple[int, int]: ...

    async def blob_sizes(self) -> dict[str, int]:
        """digest → size of every stored blob (for `mirror ls`)."""

    async def verify(self) -> VerifyResult:
        """Re-hash what is stored, delete what does not match."""

    async def collect_garbage(self, to: int | None) -> list[str]:
        """Tidy beyond the local directory (the bucket, evicted down to `to` when given):
        report lines; NotTidied when that could not be done."""


class NoUpload:
    """The upload of a backend that keeps no second copy."""

    def progress(self, written: int) -> None:
        pass

    async def complete(self) -> None:
        pass

    async def abort(self) -> None:
        pass
