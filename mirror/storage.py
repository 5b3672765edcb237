"""Content-addressed files on disk: blobs and manifests, stored once per digest.

Layout under `storage.path`:

    blobs/sha256/ab/abcdef...       layer and config blobs, the raw bytes
    manifests/sha256/ab/abcdef...   "<media type>\\n" then the manifest bytes
    tmp/                            downloads in progress; emptied at start

A file appears under its digest only by `rename` from `tmp/` (same filesystem, so atomic)
after its hash matched and it was fsynced: a reader never sees a partial or wrong file.
Every call that touches the disk runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from mirror.reference import Digest, compute_digest


class Storage:
    """The cache directory: where each digest lives, and atomic writes into it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self.manifests / digest.algorithm / digest.hex[:2] / digest.hex

    async def open(self) -> None:
        """Create the layout and throw away what a crash left in `tmp/`."""
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        for directory in (self.blobs, self.manifests):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    async def blob_size(self, digest: Digest) -> int | None:
        """Size of the cached blob, or None when it is not cached."""
        try:
            stat = await asyncio.to_thread(os.stat, self.blob_path(digest))
        except FileNotFoundError:
            return None
        return stat.st_size

    def new_temp(self) -> tuple[int, Path]:
        """An open, empty file in `tmp/` (blocking: call from a worker thread)."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        return fd, Path(name)

    @staticmethod
    def commit(fd: int, temp: Path, final: Path) -> None:
        """fsync `fd`, close it and rename `temp` to `final` (blocking)."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp, final)

    @staticmethod
    def discard(fd: int | None, temp: Path | None) -> None:
        """Close and delete an abandoned temp file (blocking)."""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if temp is not None:
            temp.unlink(missing_ok=True)

    async def read_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """(media type, bytes) of a cached manifest, or None."""
        try:
            raw = await asyncio.to_thread(self.manifest_path(digest).read_bytes)
        except FileNotFoundError:
            return None
        media_type, _, body = raw.partition(b"\n")
        return media_type.decode(), body

    async def write_manifest(self, digest: Digest, media_type: str, body: bytes) -> bool:
        """Store a manifest if its bytes hash to `digest`: True when a new file was written."""
        if compute_digest(body, digest.algorithm) != digest or "\n" in media_type:
            return False
        return await asyncio.to_thread(
            self._write_sync, self.manifest_path(digest), media_type, body
        )

    def _write_sync(self, final: Path, media_type: str, body: bytes) -> bool:
        if final.exists():
            return False
        fd, temp = self.new_temp()
        try:
            with os.fdopen(fd, "wb", closefd=False) as file:
                file.write(media_type.encode() + b"\n" + body)
        except BaseException:
            self.discard(fd, temp)
            raise
        try:
            self.commit(fd, temp, final)
        except BaseException:
            self.discard(None, temp)
            raise
        return True

    async def usage(self) -> tuple[int, int]:
        """(bytes, files) stored under blobs/ and manifests/."""
        return await asyncio.to_thread(self._usage_sync)

    def _usage_sync(self) -> tuple[int, int]:
        total = count = 0
        for top in (self.blobs, self.manifests):
            for dirpath, _, files in os.walk(top):
                for name in files:
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
                    count += 1
        return total, count

    async def is_writable(self) -> bool:
        """Can a file be created in `tmp/` right now?"""
        return await asyncio.to_thread(self._probe_sync)

    def _probe_sync(self) -> bool:
        try:
            with tempfile.TemporaryFile(dir=self.tmp) as probe:
                probe.write(b"ok")
        except OSError:
            return False
        return True
