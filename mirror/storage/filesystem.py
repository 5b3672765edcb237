"""Content-addressed files on disk: blobs and manifests, stored once per digest.

Layout under `storage.path`:

    blobs/sha256/ab/abcdef...       layer and config blobs, the raw bytes
    manifests/sha256/ab/abcdef...   "<media type>\\n" then the manifest bytes
    tmp/                            downloads in progress; the mirror's own files in it
                                    removed at start by a serve alone on the directory,
                                    else swept of what is abandoned (storage/localflight.py);
                                    files of other names never touched
    tmp.lock                        locked shared by every process using tmp/ while it
                                    runs (see USERS_LOCK)
    eviction/                       with workers: their eviction's count and turn
                                    (storage/tally.py)

A file appears under its digest only by `rename` from `tmp/` (same filesystem, so atomic)
after its hash matched and it was fsynced: a reader never sees a partial or wrong file.
Every call that touches the disk runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from mirror.metadata.store import MetadataStore
from mirror.oci.reference import Digest, as_digest, compute_digest
from mirror.storage.base import Found, NoUpload, Upload, VerifyResult
from mirror.storage.localflight import TEMP_PREFIX, is_own, own_files, sweep
from mirror.util.filelock import lock_within, same_file, try_lock, try_lock_shared
from mirror.util.files import sync_directory

log = logging.getLogger(__name__)

PROBE_INTERVAL = 10.0
TOUCH_INTERVAL = 60.0
# Every process that may write temp files (a serve, each worker, a one-shot command) holds
# a shared flock on this file while it runs; the kernel drops a dead one's. A starting
# serve that gets it exclusively knows that nothing alive writes in tmp/, so it may empty
# it; otherwise it removes only what is provably abandoned.
USERS_LOCK = "tmp.lock"
# How long (seconds) a process waits for another's check of the room promised to temp files
# (a check takes microseconds: one waited for longer is held by a process that stopped).
PROMISE_PATIENCE = 0.05


class Storage:
    """The cache directory: where each digest lives, and atomic writes into it."""

    def __init__(self, root: Path, max_size: int | None = None) -> None:
        self.root = root.resolve()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        self.max_size = max_size
        # A new temp file's room is checked against what every download under way was
        # promised (`_promise`): one check at a time in this process (new_temp runs in
        # worker threads), and across processes on the directory (a flock on tmp/).
        self._promises = threading.Lock()
        # False after a write failed (disk full, read-only): blobs then stream from
        # upstream uncached until a probe, at most every PROBE_INTERVAL, finds it writable.
        self.writable = True
        self._probed_at = 0.0
        self.on_writable_change: Callable[[bool], None] | None = None
        # Several processes serve from this directory (workers): tmp/ holds the others'
        # live downloads, so a starting one sweeps it (localflight.py) instead of emptying it,
        # and a file being read is locked shared, so that no process's eviction removes it.
        self.shared = False
        # A one-shot command (warm, ls, gc, verify) may run beside a live serve: it leaves
        # tmp/ as it finds it, for the next serve's start to clean.
        self.offline = False
        self._users_lock: int | None = None
        # Told the size of each blob the store itself puts in the directory (not those of
        # downloads, whose service reports them): the eviction counts them.
        self.on_landed: Callable[[int], None] | None = None
        # Told when the layout had to be made again (the directory emptied under the
        # mirror): the counts of what it holds are to be taken again.
        self.on_emptied: Callable[[], None] | None = None

    def fits(self, size: int | None) -> bool:
        """Could a blob of `size` bytes be cached at all under `max_size`?"""
        return self.max_size is None or size is None or size <= self.max_size

    def mark_unwritable(self, exc: OSError) -> None:
        """Remember that writes fail; logged once per episode, not once per request."""
        if self.writable:
            log.error(
                "cache directory %s takes no writes (%s): serving uncached",
                self.root,
                exc.strerror or exc,
            )
        self.writable = False
        self._probed_at = time.monotonic()
        if self.on_writable_change is not None:
            self.on_writable_change(False)

    async def writable_now(self) -> bool:
        """The writable flag, re-probed when it is down and the last probe is old."""
        if self.writable or time.monotonic() - self._probed_at < PROBE_INTERVAL:
            return self.writable
        self._probed_at = time.monotonic()
        if await self.is_writable():
            log.warning("cache directory %s takes writes again", self.root)
            self.writable = True
            if self.on_writable_change is not None:
                self.on_writable_change(True)
        return self.writable

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self.manifests / digest.algorithm / digest.hex[:2] / digest.hex

    @staticmethod
    def walk(top: Path) -> Iterator[tuple[str, str]]:
        """("algorithm:hex", path) of every file under `blobs/` or `manifests/`, as the
        layout names it (blocking); the name is not checked to be a valid digest."""
        for dirpath, _, files in os.walk(top):
            algorithm = os.path.basename(os.path.dirname(dirpath))
            for name in files:
                yield f"{algorithm}:{name}", os.path.join(dirpath, name)

    async def open(self) -> None:
        """Create the layout and throw away what a crash left in `tmp/` (a one-shot command
        leaves it: a serve may be running).

        A cache that takes no writes does not stop the start: what it holds is served.
        """
        try:
            await asyncio.to_thread(self._open_sync)
        except OSError as exc:
            self.mark_unwritable(exc)

    async def close(self) -> None:
        """Let go of the directory's users lock (tmp/ is no longer written by us)."""
        fd, self._users_lock = self._users_lock, None
        if fd is not None:
            os.close(fd)

    async def attach(self, metadata: MetadataStore, busy: Callable[[], Iterable[object]]) -> None:
        """Nothing to keep: the files' mtimes are their last-read times."""

    async def health(self) -> dict[str, str]:
        return {}

    def _open_sync(self) -> None:
        for directory in (self.blobs, self.manifests, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        if self._users_lock is None:
            self._users_lock = _open_lock_file(self.root / USERS_LOCK)
        if not self.offline:
            self._clean_tmp(self._users_lock)
        # Blocking: a serve starting at this moment holds it exclusively while it empties
        # tmp/ (from exclusive to shared here is not atomic, but nothing of ours is in it).
        fcntl.flock(self._users_lock, fcntl.LOCK_SH)

    def _clean_tmp(self, users_lock: int) -> None:
        """Throw away what a crash left in tmp/, and nothing a live process writes nor
        anything the mirror did not make."""
        if not self.shared and try_lock(users_lock):
            # Nobody else alive on the directory: all of ours in tmp/ is leftovers.
            for path in own_files(self.tmp):
                path.unlink(missing_ok=True)
        else:
            # Workers, or another process runs here (a serve, a one-shot command): what a
            # live download holds stays, and so does what was written to lately.
            sweep(self.tmp)
        others = [path.name for path in self.tmp.iterdir() if not is_own(path.name)]
        if others:
            log.warning(
                "%s holds %d entries the mirror did not make (%s): left alone",
                self.tmp,
                len(others),
                ", ".join(sorted(others)[:3]),
            )

    async def blob_size(self, digest: Digest) -> int | None:
        """Size of the cached blob, or None; a hit also marks the blob as recently read."""
        return await asyncio.to_thread(self._touch_sync, self.blob_path(digest))

    @staticmethod
    def _touch_sync(path: Path) -> int | None:
        # The file's mtime is its last-read time, which eviction orders by. Setting it
        # at most once a minute keeps a hot blob from costing a write per request.
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        now = time.time()
        if now - stat.st_mtime > TOUCH_INTERVAL:
            try:
                os.utime(path, (now, now))
            except OSError:  # a read-only cache still serves what it has
                pass
        return stat.st_size

    def open_blob(self, digest: Digest) -> BinaryIO:
        """The cached blob open for reading (blocking); FileNotFoundError if not there."""
        return self.open_reading(self.blob_path(digest))

    def open_reading(self, path: Path) -> BinaryIO:
        """A blob's file (cached or still in tmp/) open for reading (blocking). With
        workers it is locked shared until closed: an eviction pass of any process leaves it.
        One that a pass holds right now is being removed: FileNotFoundError, as if gone."""
        file = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        if self.shared and not try_lock_shared(file.fileno()):
            file.close()
            raise FileNotFoundError(errno.ENOENT, "being evicted", str(path))
        return file

    async def find_blob(
        self, digest: Digest, byte_range: str | None, *, head: bool
    ) -> Found | None:
        """The directory is the whole cache: a miss is a miss."""
        return None

    async def contains(self, digest: Digest) -> bool:
        return await self.blob_size(digest) is not None

    def start_upload(self, digest: Digest, size: int | None, temp: Path) -> Upload:
        return NoUpload()

    def new_temp(self, size: int | None = None, reserve: int | None = None) -> tuple[int, Path]:
        """An open file in `tmp/`, with `size` bytes of disk reserved when known (blocking:
        call from a worker thread). Reserving up front means a blob that cannot fit fails
        here, before any client has been sent a byte, and writes skip block allocation.

        `reserve`: reserve only that much now, the rest as the bytes come (`reserve`): a
        size an upstream announced is its word, and one that announced 64 GiB and then
        trickles must hold no more disk than it sent. The whole size must still be free."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=TEMP_PREFIX)
        if size:
            now = size if reserve is None else min(size, reserve)
            try:
                self._promise(fd, size, now)
            except BaseException:
                self.discard(fd, Path(name))
                raise
        return fd, Path(name)

    def _promise(self, fd: int, size: int, now: int) -> None:
        """Reserve `now` bytes of a `size`-byte temp file and promise it the rest: ENOSPC
        unless `size` is free beyond what the downloads under way were promised (blocking).
        Every sized temp file is held to it (a 10 MiB layer, reserved whole, as a 10 GiB
        one), so none takes the room promised to a download already under way; else
        several large ones all pass the check, fill the disk together and none is kept.

        The promise is the file itself: made `size` bytes long at once, a temp file is
        promised what it has not allocated yet (`promised_in`). So every process on the
        directory (workers) sees it, a download taken over from a dead worker keeps it,
        and it ends with the file (renamed into the cache or removed)."""
        with self._promises, _held(self.tmp):
            _check_room(self.tmp, size + promised_in(self.tmp))
            try:
                os.posix_fallocate(fd, 0, now)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not every fs can
                    raise
            os.ftruncate(fd, size)

    def reserve(self, fd: int, temp: Path, start: int, length: int) -> None:
        """Reserve `length` more bytes of `fd`'s file (`temp`) from `start` (blocking);
        ENOSPC as any failed write, nothing where the filesystem cannot. What it reserves
        is no longer promised (the file's blocks grow)."""
        try:
            os.posix_fallocate(fd, start, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def commit(self, fd: int, temp: Path, final: Path) -> None:
        """fsync `fd`, close it and rename `temp` to `final` (blocking). The directory the
        name lands in is fsynced too (and the parent of each directory made for it): without
        it a power cut can lose the rename of a file whose bytes were on disk, and the
        blob would be fetched again. Cached data is never wrong either way."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(temp, final)
            made: list[Path] = []
        except FileNotFoundError:  # the blob's directory is new (the first of its prefix)
            made = _make_directories(final.parent)
            os.rename(temp, final)
        for directory in (final.parent, *(new.parent for new in made)):
            sync_directory(directory)

    def discard(self, fd: int | None, temp: Path | None) -> None:
        """Close and delete an abandoned temp file (blocking)."""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if temp is not None:
            temp.unlink(missing_ok=True)

    async def verified_blob_size(self, digest: Digest) -> int | None:
        """The size of the blob's file, hashed again and found to match; None when it is
        not kept (or no longer matches)."""

        def check() -> int | None:
            path = self.blob_path(digest)
            try:
                return path.stat().st_size if _file_matches(str(path), digest, False) else None
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(check)

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
            for _, path in self.walk(top):
                try:
                    total += os.stat(path).st_size
                except FileNotFoundError:
                    continue
                count += 1
        return total, count

    async def disk_space(self) -> tuple[int, int]:
        """(free, total) bytes of the filesystem holding the cache."""
        stat = await asyncio.to_thread(os.statvfs, self.root)
        return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize

    async def is_writable(self) -> bool:
        """Can a file be created in `tmp/` right now? (`on_emptied` is told when the
        layout had to be made again.)"""
        writable, remade = await asyncio.to_thread(self._probe_sync)
        if remade and self.on_emptied is not None:
            self.on_emptied()
        return writable

    def _probe_sync(self) -> tuple[bool, bool]:
        """Whether tmp/ takes a file, the layout made again first where the directory was
        emptied while the mirror ran (`rm -rf /var/lib/mirror/*`): else it never cached
        again. The directory itself is not made: gone, it may be an unmounted volume.
        Also whether the layout was made again."""
        remade = False
        try:
            for directory in (self.blobs, self.manifests, self.tmp):
                if not directory.is_dir():
                    directory.mkdir(exist_ok=True)
                    remade = True
            self._relock_users()
            with tempfile.TemporaryFile(dir=self.tmp) as probe:
                probe.write(b"ok")
        except OSError:
            return False, remade
        return True, remade

    def _relock_users(self) -> None:
        """The users lock again when its file was removed: a process starting now locks
        the new file, and must find this one among its users (blocking)."""
        path = self.root / USERS_LOCK
        if self._users_lock is None or same_file(self._users_lock, path):
            return
        fd = _open_lock_file(path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        old, self._users_lock = self._users_lock, fd
        os.close(old)

    async def blob_sizes(self) -> dict[str, int]:
        return await asyncio.to_thread(self._blob_sizes_sync)

    def _blob_sizes_sync(self) -> dict[str, int]:
        sizes = {}
        for digest, path in self.walk(self.blobs):
            try:
                sizes[digest] = os.stat(path).st_size
            except FileNotFoundError:
                continue
        return sizes

    async def verify(self) -> VerifyResult:
        return await asyncio.to_thread(self.verify_sync)

    def verify_sync(self) -> VerifyResult:
        """Re-hash every blob and manifest; delete the corrupt ones (blocking)."""
        checked, removed = 0, []
        for top in (self.blobs, self.manifests):
            for name, path in sorted(self.walk(top), key=lambda found: found[1]):
                digest = as_digest(name)
                if digest is None:
                    continue  # not ours (an editor's backup file, say): leave it alone
                try:
                    if not _file_matches(path, digest, skip_line=top == self.manifests):
                        os.unlink(path)
                        removed.append(str(digest))
                except FileNotFoundError:
                    continue  # evicted meanwhile: nothing left to check
                checked += 1
        return VerifyResult(checked, removed)

    async def collect_garbage(self, to: int | None) -> list[str]:
        return []


def promised_in(tmp: Path) -> int:
    """What the temp files in `tmp` (every process's) were promised and have not got yet:
    each is made its blob's length at once, and its blocks grow as it is reserved or
    written (blocking)."""
    total = 0
    with os.scandir(tmp) as entries:
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX) or not is_own(entry.name):
                continue
            try:
                found = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # landed or removed meanwhile
                continue
            if stat.S_ISREG(found.st_mode):
                total += max(found.st_size - found.st_blocks * 512, 0)
    return total


@contextlib.contextmanager
def _held(tmp: Path) -> Iterator[None]:
    """One process at a time checks the room it is promised (blocking): else two workers
    starting a large download at once both find the other's promise not made yet. An
    exclusive flock on `tmp` itself, opened for the check (no file of its own, and none
    kept open past a directory made again). A holder that hangs (a stopped process) is
    waited for PROMISE_PATIENCE at most, then the check runs unheld, as where the
    filesystem has no such locks."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # a filesystem without such locks
                lock_within(fd, PROMISE_PATIENCE)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # the lock goes with it


def _check_room(directory: Path, size: int) -> None:
    """ENOSPC unless `size` bytes are free under `directory` now."""
    free = os.statvfs(directory)
    if free.f_bavail * free.f_frsize < size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        # A read-only cache still serves what it holds, and its lock file is still locked.
        return os.open(path, os.O_RDONLY)


def _file_matches(path: str, digest: Digest, skip_line: bool) -> bool:
    hasher = digest.hasher()
    with open(path, "rb") as file:
        if skip_line:
            file.readline()  # a manifest file's media type line is not part of the manifest
        while chunk := file.read(1024 * 1024):
            hasher.update(chunk)
    return hasher.hexdigest() == digest.hex


def _make_directories(path: Path) -> list[Path]:
    """Make `path` and its missing ancestors; those made, deepest first (blocking)."""
    missing: list[Path] = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)  # another process may make it at the same moment
    return missing
