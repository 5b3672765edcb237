"""The metadata store the processes of one host share without Redis: a SQLite file.

Worker processes on one cache directory must see one another's tag records (so a tag is
revalidated once per TTL, not once per process) and fetched upstream tokens. SQLite in WAL
mode gives that with nothing to run: readers never wait for the writer, and a process that
dies mid-write leaves no lock behind.

A file another process keeps locked (a worker stopped mid-write, a shell left in a
transaction) must cost metadata alone, and briefly. So each process reads on one
connection and writes on another, each with a thread of its own, never the event loop's
default threads that cached blob hits stat and open files on. Reads go on while writes
wait; a write waits at most `BUSY_TIMEOUT_MS` for the lock, and the writes queued behind
one that failed fail at once, so the caller answers them all from memory together rather
than one timeout after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mirror.metadata.store import RETENTION, TagRecord
from mirror.util.filelock import lock_within

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a statement waits for another process's lock before it fails. Each write here
# is one small autocommit statement, holding the lock about a millisecond (a WAL append,
# no fsync with synchronous=NORMAL), so 250 ms lets a burst of every worker's writes
# through, and a lock held longer than that is held by something stuck: the caller is
# better answered from memory. (A WAL reader waits only for a crashed writer's recovery.)
BUSY_TIMEOUT_MS = 250
# How often (seconds) a connection checks that the file at the path is still the one it
# opened.
RELOOK_EVERY = 1.0
# How long (seconds) a connect waits for another process making or replacing the file.
LOCK_PATIENCE = 1.0
# The files SQLite keeps beside the database in WAL mode.
_JOURNALS = ("-wal", "-shm")
# Result codes (their low byte) that say the file is no database, or a damaged one.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    record TEXT NOT NULL, checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repos (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bucket_blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, read_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holdings (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    key TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


class _Lane:
    """One connection with a thread of its own, its calls taking turns; those queued
    behind one that failed fail at once (the file did not answer while they waited).

    The connection follows the file at its path: made anew when the file there is no
    longer the one it opened (deleted, or set aside as damaged by another process), else
    this process would go on alone on a file the others no longer see; and after the
    file was found damaged."""

    def __init__(
        self, name: str, path: Path, connect: Callable[[bool], tuple[sqlite3.Connection, int]]
    ) -> None:
        self._path = path
        self._connect = connect
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"metadata-{name}")
        self._db: sqlite3.Connection | None = None
        self._inode = 0  # of the file the connection opened
        self._looked_at = 0.0  # when the path was last checked to be that file
        self._failures = 0  # counted on the lane's thread, read when a call is queued
        self._damaged = False  # a call found the file damaged: checked whole at the connect
        self._closed = False

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise sqlite3.ProgrammingError("the metadata store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._in_turn, work, self._failures)

    def _in_turn(self, work: Callable[[sqlite3.Connection], T], failures_seen: int) -> T:
        if self._failures != failures_seen:
            raise sqlite3.OperationalError("the metadata file failed while this call waited")
        try:
            if self._db is not None and self._replaced():
                self._close_db()
            if self._db is None:
                self._db, self._inode = self._connect(self._damaged)
                self._damaged = False
                self._looked_at = time.monotonic()
            return work(self._db)
        except Exception as exc:
            self._failures += 1
            if damaged(exc):  # the next call connects again, and sets the file aside
                self._damaged = True
                self._close_db()
            raise

    def _replaced(self) -> bool:
        """Is the file at the path no longer the connection's? Looked at once a second."""
        now = time.monotonic()
        if now - self._looked_at < RELOOK_EVERY:
            return False
        self._looked_at = now
        try:
            return os.stat(self._path).st_ino != self._inode
        except FileNotFoundError:
            return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:  # after the calls already queued
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close_db)
        finally:
            self._pool.shutdown(wait=False)

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class SqliteMetadata:
    """Tag records, holdings, the catalogue, bucket reads and upstream tokens in one file."""

    def __init__(self, path: Path, ttl: float, retention: float = RETENTION) -> None:
        self._path = path
        self._expiry = ttl + retention
        self._reads = _Lane("read", path, lambda check: self._connect(_read_only, check))
        self._writes = _Lane("write", path, lambda check: self._connect(self._prune, check))

    def _connect(
        self, prepare: Callable[[sqlite3.Connection], Any], check: bool
    ) -> tuple[sqlite3.Connection, int]:
        """A connection to the file, and the file's inode (blocking). One process at a time
        makes the file, puts it in WAL mode or replaces it (workers starting together on
        a new file failed with "disk I/O error"), not while `prepare` may wait for a
        writer. A file that is no database or is damaged (torn by a crash of the disk,
        overwritten) is set aside and a new one made: it holds only what the upstream
        answers again, and left there it kept every worker off the shared store, and
        /readyz at 503, until someone removed it by hand."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        lock = self._path.with_name(self._path.name + ".lock")
        try:
            with _turn(lock):
                inode = self._make_file()
                db = self._open(check)
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            with _turn(lock):
                self._set_aside(exc, inode)
                inode = self._make_file()
                db = self._open(False)
        try:
            prepare(db)
        except BaseException:
            db.close()
            raise
        return db, inode

    def _make_file(self) -> int:
        """The file's inode; made if missing, readable by this user only (it holds upstream
        tokens). A new file's journal files left by one deleted must not be applied to it."""
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return os.stat(self._path).st_ino
        try:
            for suffix in _JOURNALS:
                Path(f"{self._path}{suffix}").unlink(missing_ok=True)
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def _set_aside(self, exc: sqlite3.DatabaseError, inode: int) -> None:
        """Move the damaged file (`inode`) out of the way, unless another process did."""
        try:
            if os.stat(self._path).st_ino != inode:
                return
        except FileNotFoundError:
            return
        aside = self._path.with_name(f"{self._path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(self._path, aside)
        for suffix in _JOURNALS:
            Path(f"{self._path}{suffix}").unlink(missing_ok=True)
        log.error(
            "metadata file %s is damaged (%s): set aside as %s, a new one made",
            self._path, exc, aside.name,
        )  # fmt: skip

    def _open(self, check: bool) -> sqlite3.Connection:
        """A connection in WAL mode on the schema; the file checked whole first when a call
        found it damaged (its header and schema can be sound while pages are not)."""
        db = sqlite3.connect(
            self._path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
            isolation_level=None,  # autocommit: every statement is its own transaction
        )  # fmt: skip
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # WAL with NORMAL is durable across process crashes (what workers fear); a power
            # cut may lose the last records, which are only revalidated again.
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)  # takes no lock once the tables are there
            if check and (found := db.execute("PRAGMA quick_check(1)").fetchone()) != ("ok",):
                raise _Damaged(f"quick_check: {found}")
        except BaseException:
            db.close()
            raise
        return db

    def _prune(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM tags WHERE checked_at < ?", (time.time() - self._expiry,))
        db.execute("DELETE FROM holdings WHERE at < ?", (time.time() - self._expiry,))
        db.execute("DELETE FROM tokens WHERE expires_at < ?", (time.time(),))

    async def _execute(self, sql: str, *args: Any) -> None:
        await self._writes.run(lambda db: db.execute(sql, args))

    async def _rows(self, sql: str, *args: Any) -> list[Any]:
        return await self._reads.run(lambda db: db.execute(sql, args).fetchall())

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        rows = await self._rows(
            "SELECT record FROM tags WHERE upstream = ? AND repo = ? AND tag = ?"
            " AND checked_at >= ?",
            upstream, repo, tag, time.time() - self._expiry,
        )  # fmt: skip
        return TagRecord.from_json(rows[0][0]) if rows else None

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            upstream, repo, tag, record.to_json(), record.checked_at,
        )  # fmt: skip

    async def add_holdings(
        self, upstream: str, repo: str, digests: Sequence[str], at: float
    ) -> None:
        rows = [(upstream, repo, digest, at) for digest in digests]

        def add(db: sqlite3.Connection) -> None:
            # One transaction, its lock taken (and waited for) at BEGIN: an executemany in
            # autocommit that met another process's lock midway failed the statements after
            # with "bad parameter or other API misuse", and the worker fell to memory.
            db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    db.execute("INSERT OR REPLACE INTO holdings VALUES (?, ?, ?, ?)", row)
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")

        await self._writes.run(add)

    async def holds(self, upstream: str, repo: str, digest: str) -> bool:
        rows = await self._rows(
            "SELECT 1 FROM holdings WHERE upstream = ? AND repo = ? AND digest = ? AND at >= ?",
            upstream, repo, digest, time.time() - self._expiry,
        )  # fmt: skip
        return bool(rows)

    async def add_repository(self, repo: str) -> None:
        await self._execute("INSERT OR IGNORE INTO repos VALUES (?)", repo)

    async def repositories(self, n: int, last: str | None) -> list[str]:
        # BINARY collation: the byte order `_catalog` pages in, as Redis's ZRANGEBYLEX.
        rows = await self._rows(
            "SELECT name FROM repos WHERE name > ? ORDER BY name LIMIT ?", last or "", n
        )
        return [str(row[0]) for row in rows]

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        rows = await self._rows(
            "SELECT upstream, repo, tag, record FROM tags WHERE checked_at >= ?",
            time.time() - self._expiry,
        )
        found = [(u, r, t, TagRecord.from_json(raw)) for u, r, t, raw in rows]
        return [(u, r, t, record) for u, r, t, record in found if record is not None]

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO bucket_blobs VALUES (?, ?, ?)", digest, size, read_at
        )

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        rows = await self._rows("SELECT digest, size, read_at FROM bucket_blobs")
        return {str(d): (int(size), float(at)) for d, size, at in rows}

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        rows = await self._rows("SELECT size, read_at FROM bucket_blobs WHERE digest = ?", digest)
        return (int(rows[0][0]), float(rows[0][1])) if rows else None

    async def touch_blob_read(self, digest: str, read_at: float) -> int | None:
        def touch(db: sqlite3.Connection) -> int | None:
            sql = "UPDATE bucket_blobs SET read_at = ? WHERE digest = ?"
            if db.execute(sql, (read_at, digest)).rowcount == 0:
                return None
            sql = "SELECT size FROM bucket_blobs WHERE digest = ?"
            rows = db.execute(sql, (digest,)).fetchall()
            return int(rows[0][0]) if rows else None  # dropped between the two: gone

        return await self._writes.run(touch)

    async def forget_blob(self, digest: str) -> None:
        await self._execute("DELETE FROM bucket_blobs WHERE digest = ?", digest)

    async def get_token(self, key: str) -> tuple[str, float] | None:
        """A token another process fetched for `key`, with its time of expiry, if still good."""
        rows = await self._rows(
            "SELECT token, expires_at FROM tokens WHERE key = ? AND expires_at > ?",
            key, time.time(),
        )  # fmt: skip
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    async def put_token(self, key: str, token: str, expires_at: float) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?)", key, token, expires_at
        )

    async def close(self) -> None:
        await asyncio.gather(self._reads.close(), self._writes.close())


class _Damaged(sqlite3.DatabaseError):
    """The file's check found it damaged."""

    sqlite_errorcode = sqlite3.SQLITE_CORRUPT


def damaged(exc: Exception) -> bool:
    """Does the error say the file is no database, or a damaged one?"""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGED


@contextlib.contextmanager
def _turn(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for making or replacing the file (blocking): waited for
    LOCK_PATIENCE at most (a process stopped while it holds it), then OperationalError,
    which the caller answers from memory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not lock_within(fd, LOCK_PATIENCE):
            raise sqlite3.OperationalError(f"{path.name} is held by another process")
        yield
    finally:
        os.close(fd)  # the lock goes with it


def _read_only(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA query_only = ON")
