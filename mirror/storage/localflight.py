"""One download per digest among the processes sharing a cache directory (workers).

The process that fetches a blob holds an exclusive `flock` on `tmp/<alg>-<hex>.lock` for
the whole download and writes there where its bytes go, and how far they got:

    <written, 20 digits> <state: w writing, v verified> <size, 20 digits or -1> <temp name>

Another process that wants the blob finds the lock taken and follows: it reads the temp
file as `written` grows (same disk, no HTTP hop) and sends the last byte once the state
says verified, as the owner's own readers do. The kernel drops a dead owner's lock: the
first follower to lock the file then owns the download, with the header telling it which
temp file holds how many good bytes (it re-hashes them and resumes with Range).

An owner unlinks the lock file before it unlocks; a process that locks a file checks that
its path still leads to it, so a finished download's lock is never taken for a live one.

An owner whose download failed upstream (a timeout, a 404) says so first, in
`<alg>-<hex>.failed` ("<error class> <message>"): the processes that followed it fail their
clients with that for FAILED_FOR, rather than each asking the failing upstream in turn,
one timeout after another. Markers past FAILED_FOR are removed as they are read, and in a
pass over tmp/ at most once per SWEEP_EVERY as downloads are claimed: digests come from
clients, and one failing upstream must not leave a file per digest asked until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mirror.oci.reference import Digest
from mirror.util.filelock import release, same_file, try_lock
from mirror.util.files import write_replacing
from mirror.util.settle import wait_out

_WRITTEN = 20  # the header's first field, rewritten in place as the download grows
_STATE_AT = _WRITTEN + 1
_HEADER_MIN = _STATE_AT + 2 + _WRITTEN + 1
# Bytes re-hashed per read when a download is taken over.
READ_CHUNK = 1024 * 1024
# A file in tmp/ that no held lock names is a crash's leftover once this old.
STALE_TEMP = 15 * 60.0
# The names of what the mirror itself puts in tmp/: temp files of downloads and spools
# (storage/filesystem.py `new_temp`: mkstemp's 8 characters after TEMP_PREFIX), a writability
# probe where the OS has no unnamed temp files, the claims and failure markers above, and a
# marker being replaced (util/files.py). Only these are ever removed there: tmp/ of a
# mistaken storage.path (`/`, a home) holds files of others.
TEMP_PREFIX = "blob-"
_OWN_NAME = re.compile(
    rf"{TEMP_PREFIX}[a-z0-9_]{{8}}|tmp[a-z0-9_]{{8}}|(sha256|sha512)-[0-9a-f]+\.(lock|failed)"
    r"|\.(sha256|sha512)-[0-9a-f]+\.failed\.[a-z0-9_]{8}\.tmp"
)
# How long (seconds) a download's failure answers the processes that followed it.
FAILED_FOR = 5.0
# The most of a failure's message kept for them.
FAILURE_TEXT = 300
# Seconds between two passes removing the failure markers that ran out.
SWEEP_EVERY = 60.0


@dataclass(frozen=True)
class Progress:
    """A download as its owner last published it."""

    temp: Path
    size: int | None
    written: int
    verified: bool


class Gone:
    """The owner let go (finished, failed, or swept): look for the file, or claim again."""


class Claim:
    """This process fetches the blob; `previous`: a dead owner's download to carry on."""

    def __init__(self, fd: int, path: Path, previous: Progress | None) -> None:
        self._fd: int | None = fd
        self.path = path
        self.previous = previous

    def start(self, temp: Path, size: int | None, written: int = 0) -> None:
        """Publish the temp file and expected size (blocking)."""
        header = f"{written:0{_WRITTEN}d} w {-1 if size is None else size:0{_WRITTEN}d} "
        self._write(0, (header + temp.name + "\n").encode(), truncate=True)

    def progress(self, written: int) -> None:
        """Publish that `written` bytes are in the temp file (blocking)."""
        self._write(0, f"{written:0{_WRITTEN}d}".encode())

    def verified(self) -> None:
        """Publish that every byte is in and the digest matched (blocking)."""
        self._write(_STATE_AT, b"v")

    def failed(self, kind: str, message: str) -> None:
        """Tell the processes following this download why it failed: before the release,
        so that none of them finds it gone without the reason (blocking)."""
        if self._fd is None:
            return
        text = f"{kind} {' '.join(message.split())[:FAILURE_TEXT]}"
        with contextlib.suppress(OSError):  # a hint for the others only: they fetch it then
            write_replacing(_failure_path(self.path), text)

    def _write(self, offset: int, data: bytes, truncate: bool = False) -> None:
        if self._fd is not None:
            if truncate:
                os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, offset)

    def beat(self) -> None:
        """Touch the lock file: this process is at work (blocking)."""
        if self._fd is not None:
            os.utime(self._fd)

    def release(self) -> None:
        """Unlink the lock file, then unlock (blocking; idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            release(fd, self.path)


class Sibling:
    """Another process fetches the blob: its progress, read from the lock file."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def poll(self) -> Progress | Claim | Gone | None:
        """The owner's progress (None: no temp file yet), or the claim when the owner died
        (its lock is ours now), or Gone (blocking)."""
        fd = self._fd
        if fd is None:
            return Gone()
        if not try_lock(fd):
            # The owner rewrites the header in place: a read that overlaps a write could
            # mix two values, so one counts only when the next read agrees with it.
            seen = _read_header(fd, self.path.parent)
            while (again := _read_header(fd, self.path.parent)) != seen:
                seen = again
            return seen
        self._fd = None
        if not same_file(fd, self.path):  # released by its owner: over
            os.close(fd)
            return Gone()
        with contextlib.suppress(OSError):  # ours now: a sign of life at once
            os.utime(fd)
        return Claim(fd, self.path, _adoptable(_read_header(fd, self.path.parent)))

    def beat(self) -> float:
        """When the owner last touched the lock file (wall clock; blocking)."""
        if self._fd is None:
            return time.time()
        return os.fstat(self._fd).st_mtime

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class LocalFlight:
    """Claims on the downloads in `tmp`; see the module docstring."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._swept_at = time.monotonic()  # the start's sweep (`sweep`) has just run

    def claim(self, digest: Digest) -> Claim | Sibling:
        """Ours to fetch, or another process's to follow (blocking)."""
        if time.monotonic() - self._swept_at >= SWEEP_EVERY:
            self._swept_at = time.monotonic()
            remove_old_markers(self._tmp)
            # What a worker killed since left and nobody claims (a bucket read's spool
            # file holds its whole size reserved): the restarted worker's start found it
            # too young to remove, and the others' starts are long past.
            sweep(self._tmp)
        path = self._tmp / f"{digest.algorithm}-{digest.hex}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                locked = try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                return Sibling(fd, path)
            if same_file(fd, path):
                with contextlib.suppress(OSError):  # a sign of life at once: the file
                    os.utime(fd)  # may be a dead owner's, and old
                return Claim(fd, path, _adoptable(_read_header(fd, self._tmp)))
            os.close(fd)  # a release unlinked it meanwhile: again

    def failure(self, digest: Digest) -> tuple[str, str] | None:
        """(error class, message) of the download of `digest` that failed within
        FAILED_FOR, if one did (blocking)."""
        marker = _failure_path(self._tmp / f"{digest.algorithm}-{digest.hex}.lock")
        try:
            if time.time() - marker.stat().st_mtime > FAILED_FOR:
                marker.unlink()  # (one written since: a hint lost, the blob fetched here)
                return None
            kind, _, message = marker.read_text().partition(" ")
        except (OSError, ValueError):
            return None
        return kind, message


def _failure_path(lock: Path) -> Path:
    return lock.with_suffix(".failed")


def sweep(tmp: Path) -> None:
    """Remove what no live download holds: the lock files nobody holds with their temp
    files, and other files left long ago (blocking). At a process's start, and every
    SWEEP_EVERY with a claim."""
    held: set[str] = set()
    for path in tmp.glob("*.lock"):
        if not is_own(path.name):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR)
            try:
                header = _read_header(fd, tmp)
                if try_lock(fd):
                    if header is not None:
                        header.temp.unlink(missing_ok=True)
                    if same_file(fd, path):
                        path.unlink()
                else:
                    held.add(path.name)
                    if header is not None:
                        held.add(header.temp.name)
            finally:
                os.close(fd)
    cutoff = time.time() - STALE_TEMP
    for path in own_files(tmp):
        with contextlib.suppress(OSError):
            if path.name not in held and path.stat().st_mtime < cutoff:
                path.unlink()


def remove_old_markers(tmp: Path) -> int:
    """Remove the failure markers in `tmp` past FAILED_FOR; how many (blocking)."""
    removed = 0
    stale = time.time() - FAILED_FOR
    with contextlib.suppress(OSError), os.scandir(tmp) as entries:
        for entry in entries:
            if entry.name.endswith(".failed") and is_own(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < stale:
                        os.unlink(entry.path)
                        removed += 1
    return removed


def own_files(tmp: Path) -> list[Path]:
    """The files in `tmp` named as the mirror names its own (blocking)."""
    return [path for path in tmp.iterdir() if is_own(path.name) and path.is_file()]


def is_own(name: str) -> bool:
    """Whether a name in tmp/ is one the mirror gives its own files."""
    return _OWN_NAME.fullmatch(name) is not None


R = TypeVar("R")


async def held_off_loop(call: Callable[[], R]) -> R:
    """`call()` in a thread (a claim's or a poll's: a lock tried, never waited for), awaited
    to its end even if the caller is cancelled meanwhile: what closes the descriptor it
    uses next must not race it. Cancelled, the claim or lock file it returned is let go,
    not left held until the process ends."""
    running = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        await wait_out(running)
    except asyncio.CancelledError:
        if running.exception() is None:
            _let_go(running.result())
        raise
    return running.result()


def _let_go(got: object) -> None:
    if isinstance(got, Claim):
        got.release()
    elif isinstance(got, Sibling):
        got.close()


def reopen(temp: Path, written: int, hasher: hashlib._Hash) -> int:
    """The temp file open for writing at `written`, its first `written` bytes hashed."""
    fd = os.open(temp, os.O_RDWR)
    try:
        pos = 0
        while pos < written:
            chunk = os.pread(fd, min(READ_CHUNK, written - pos), pos)
            if not chunk:
                raise OSError(f"{temp} is shorter than {written} bytes")
            hasher.update(chunk)
            pos += len(chunk)
        os.lseek(fd, written, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_header(fd: int, tmp: Path) -> Progress | None:
    raw = os.pread(fd, 4096, 0)
    if len(raw) < _HEADER_MIN or not raw.endswith(b"\n"):
        return None
    try:
        written, state, size, name = raw[:-1].decode().split(" ", 3)
        total = int(size)
        progress = Progress(tmp / name, None if total < 0 else total, int(written), state == "v")
    except ValueError:
        return None
    if not name or "/" in name or name.startswith("."):  # a file of tmp/ only
        return None
    return progress


def _adoptable(previous: Progress | None) -> Progress | None:
    """A dead owner's download, if its temp file is still there to carry on (and holds
    no more than the blob's size)."""
    if previous is None or not previous.temp.is_file():
        return None
    if previous.size is not None and previous.written > previous.size:
        return None
    return previous
