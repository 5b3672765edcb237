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
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mirror.metadata.store import RETENTION, TagRecord

T = TypeVar("T")

# How long a statement waits for another process's lock before it fails. Each write here
# is one small autocommit statement, holding the lock about a millisecond (a WAL append,
# no fsync with synchronous=NORMAL), so 250 ms lets a burst of every worker's writes
# through, and a lock held longer than that is held by something stuck: the caller is
# better answered from memory. (A WAL reader waits only for a crashed writer's recovery.)
BUSY_TIMEOUT_MS = 250
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
    behind one that failed fail at once (the file did not answer while they waited)."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"metadata-{name}")
        self._db: sqlite3.Connection | None = None
        self._failures = 0  # counted on the lane's thread, read when a call is queued
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
            if self._db is None:
                self._db = self._connect()
            return work(self._db)
        except Exception:
            self._failures += 1
            raise

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
        self._reads = _Lane("read", lambda: self._connect(_read_only))
        self._writes = _Lane("write", lambda: self._connect(self._prune))

    def _connect(self, prepare: Callable[[sqlite3.Connection], Any]) -> sqlite3.Connection:
        # Readable by this user only: it holds upstream tokens.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
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
            prepare(db)
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


def _read_only(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA query_only = ON")
