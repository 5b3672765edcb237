"""What a power cut leaves: a kept blob or manifest is on disk under its name, not only
its bytes (the directory entries the rename and any new directory made are fsynced)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.oci.reference import compute_digest
from mirror.storage import Storage

BODY = b"layer bytes"


def _inode(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[tuple[int, int]]]:
    """The (device, inode) of every directory fsynced while the test runs."""
    seen: set[tuple[int, int]] = set()
    real = os.fsync

    def recording(fd: int) -> None:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            seen.add((status.st_dev, status.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    yield seen


async def test_a_kept_blob_s_name_and_new_directories_are_synced(
    tmp_path: Path, synced: set[tuple[int, int]]
) -> None:
    storage = Storage(tmp_path)
    await storage.open()
    try:
        for body in (BODY, BODY + b"2"):
            synced.clear()
            digest = compute_digest(body, "sha256")
            fd, temp = storage.new_temp(len(body))
            os.pwrite(fd, body, 0)
            final = storage.blob_path(digest)
            first_of_its_kind = not final.parent.parent.exists()
            storage.commit(fd, temp, final)
            assert final.read_bytes() == body
            # The entry renamed into place, always.
            assert _inode(final.parent) in synced
            if first_of_its_kind:  # blobs/sha256/ and blobs/sha256/<xx>/ were made for it
                assert _inode(storage.blobs) in synced
                assert _inode(final.parent.parent) in synced
    finally:
        await storage.close()


async def test_a_kept_manifest_s_name_is_synced(
    tmp_path: Path, synced: set[tuple[int, int]]
) -> None:
    storage = Storage(tmp_path)
    await storage.open()
    try:
        digest = compute_digest(BODY, "sha256")
        assert await storage.write_manifest(digest, "application/json", BODY)
        final = storage.manifest_path(digest)
        assert _inode(final.parent) in synced
        assert _inode(storage.manifests) in synced
    finally:
        await storage.close()
