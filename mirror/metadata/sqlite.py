"""The metadata store the processes of one host share without Redis: a SQLite file.

Worker processes on one cache directory must see one another's tag records (so a tag is
revalidated once per TTL, not once per process) and fetched upstream tokens. SQLite in WAL
mode gives that with nothing to run: readers never wait for the writer, a writer waits
for another at most `BUSY_TIMEOUT`, and a process that dies mid-write leaves no lock
behind. Every call runs in a worker thread; one connection per process, taken in turns.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mirror.metadata.store import RETENTION, TagRecord

T = TypeVar("T")

# How long a write waits for another process's write before it fails: far above what one
# small write takes, far below a request's patience.
BUSY_TIMEOUT_MS = 5000
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


class SqliteMetadata:
    """Tag records, holdings, the catalogue, bucket reads and upstream tokens in one file."""

    def __init__(self, path: Path, ttl: float, retention: float = RETENTION) -> None:
        self._path = path
        self._expiry = ttl + retention
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._turn = threading.Lock()  # one connection: its calls take turns

    def _open_sync(self) -> None:
        # Readable by this user only: it holds upstream tokens.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(
            self._path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
            isolation_level=None,  # autocommit: every statement is its own transaction
        )  # fmt: skip
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        # WAL with NORMAL is durable across process crashes (what workers fear); a power
        # cut may lose the last records, which are only revalidated again.
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        db.execute("DELETE FROM tags WHERE checked_at < ?", (time.time() - self._expiry,))
        db.execute("DELETE FROM holdings WHERE at < ?", (time.time() - self._expiry,))
        db.execute("DELETE FROM tokens WHERE expires_at < ?", (time.time(),))
        self._db = db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._in_turn, work)

    def _in_turn(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._turn:
            if self._closed:
                raise sqlite3.ProgrammingError("the metadata store is closed")
            if self._db is None:
                self._open_sync()
            assert self._db is not None
            return work(self._db)

    async def _execute(self, sql: str, *args: Any) -> None:
        await self._run(lambda db: db.execute(sql, args))

    async def _rows(self, sql: str, *args: Any) -> list[Any]:
        return await self._run(lambda db: db.execute(sql, args).fetchall())

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
        sql = "INSERT OR REPLACE INTO holdings VALUES (?, ?, ?, ?)"
        await self._run(lambda db: db.executemany(sql, rows))

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
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._turn:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None
