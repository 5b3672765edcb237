"""The in-process metadata store of a single node, snapshotted to disk across restarts."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from mirror.metadata.store import RETENTION, TagRecord
from mirror.util.filelock import try_lock
from mirror.util.files import remove_stale_temps, write_replacing

log = logging.getLogger(__name__)
T = TypeVar("T")


# Another process's save holds the snapshot's lock for a read and a write, milliseconds.
LOCK_WAIT = 10.0
LOCK_POLL = 0.01
# A temp file of a save older than this (seconds) was left by a process killed mid-write.
STALE_TEMP = 300.0
# Unreadable snapshots set aside (`metadata.json.bad-<time>`) kept for a look: the newest.
BAD_KEPT = 3
# The stand-in behind Redis or SQLite (metadata/fallback.py) keeps at most this many tag
# records, the latest written, and as many repositories' holdings (some 500 bytes each): it
# answers only while the shared store is down, when a tag it lacks is asked upstream (a
# HEAD), so the tags a process revalidated lately are enough. Kept for the whole retention
# (a week), the records of a CI fleet tagging each commit would grow without bound.
STANDIN_ENTRIES = 10_000
# Expired entries are swept once their number has doubled since the last sweep (and is at
# least this), or a capped store is a quarter over its cap: each sweep's cost is spread over
# the writes that grew them.
SWEEP_MIN = 1024
# A snapshot file as last read or written here: (inode, size, mtime in ns).
Stamp = tuple[int, int, int]
# A holding past its retention: (upstream, repository), digest, when recorded.
Stale = tuple[tuple[str, str], str, float]


@dataclass
class Snapshot:
    """What a snapshot file holds."""

    tags: dict[tuple[str, str, str], TagRecord] = field(default_factory=dict)
    repos: list[str] = field(default_factory=list)
    bucket_blobs: dict[str, tuple[int, float]] = field(default_factory=dict)
    holdings: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    skipped: int = 0  # entries this release could not read


class MemoryMetadata:
    """In-process metadata for a single node with no Redis.

    With a `snapshot` path it survives restarts: loaded at start, written (atomically)
    when changed and at shutdown, so a restarted mirror can still answer tags while
    the upstream is down. A one-shot command (`mirror warm`) beside a live serve writes
    the same file: each save first takes in what another process wrote there since (the
    newer record of a tag winning), so that neither drops the other's records. The read,
    the merge and the write are one turn among processes (a flock on `<snapshot>.lock`):
    two saves at once would each write what it read before the other's write.

    Expired entries are swept as they grow. With a `limit` (the stand-in behind a shared
    store) it keeps at most that many tag records and repositories' holdings, the latest.
    """

    def __init__(
        self,
        ttl: float,
        retention: float = RETENTION,
        snapshot: Path | None = None,
        limit: int | None = None,
    ) -> None:
        self._expiry = ttl + retention
        self._limit = limit  # tag records, and repositories' holdings, kept at most
        # Sizes at which the tags and the holdings are swept next.
        self._tags_sweep = self._holdings_sweep = _next_sweep(0, limit)
        self._tags: dict[tuple[str, str, str], TagRecord] = {}
        self._repos: list[str] = []
        self._bucket_blobs: dict[str, tuple[int, float]] = {}
        # (upstream, repository) → digest → when it was recorded (cache/holdings.py).
        self._holdings: dict[tuple[str, str], dict[str, float]] = {}
        self._snapshot = snapshot
        self._dirty = False
        self._seen: Stamp | None = None  # the snapshot as last read or written here
        # Bucket blobs forgotten (evicted) here, and when: another process's older snapshot
        # must not bring their records back.
        self._forgotten: dict[str, float] = {}
        # The snapshot's write in its thread: a save cancelled while it runs (the periodic
        # saver at shutdown) leaves it running, and the final save waits for it, so that
        # the newest data is written last.
        self._writing: asyncio.Future[tuple[Stamp, list[Stale]]] | None = None
        self._turn = asyncio.Lock()

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        key = (upstream, repo, tag)
        record = self._tags.get(key)
        if record is not None and not record.is_fresh(self._expiry):
            del self._tags[key]
            return None
        return record

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        key = (upstream, repo, tag)
        self._tags.pop(key, None)  # the latest written last: a cap keeps those
        self._tags[key] = record
        self._dirty = True
        if len(self._tags) > self._tags_sweep:
            self._sweep_tags()

    async def add_repository(self, repo: str) -> None:
        index = bisect.bisect_left(self._repos, repo)
        if index == len(self._repos) or self._repos[index] != repo:
            self._repos.insert(index, repo)
            self._dirty = True

    async def add_holdings(
        self, upstream: str, repo: str, digests: Sequence[str], at: float
    ) -> None:
        held = self._holdings.pop((upstream, repo), {})  # put back last, as in put_tag
        oldest = time.time() - self._expiry  # a busy repository sheds what it no longer holds
        for digest in [d for d, when in held.items() if when <= oldest]:
            del held[digest]
        held.update(dict.fromkeys(digests, at))
        self._holdings[(upstream, repo)] = held
        self._dirty = True
        if len(self._holdings) > self._holdings_sweep:
            self._sweep_holdings()

    async def holds(self, upstream: str, repo: str, digest: str) -> bool:
        held = self._holdings.get((upstream, repo), {})
        at = held.get(digest)
        if at is None:
            return False
        if time.time() - at >= self._expiry:
            del held[digest]
            return False
        return True

    async def repositories(self, n: int, last: str | None) -> list[str]:
        start = bisect.bisect_right(self._repos, last) if last else 0
        return self._repos[start : start + n]

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]:
        return [(*key, record) for key, record in self._tags.items()]

    async def ping(self) -> None:
        return None

    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None:
        self._bucket_blobs[digest] = (size, read_at)
        self._dirty = True

    async def blob_reads(self) -> dict[str, tuple[int, float]]:
        return dict(self._bucket_blobs)

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None:
        return self._bucket_blobs.get(digest)

    async def touch_blob_read(self, digest: str, read_at: float) -> int | None:
        record = self._bucket_blobs.get(digest)
        if record is None:
            return None
        self._bucket_blobs[digest] = (record[0], read_at)
        self._dirty = True
        return record[0]

    async def forget_blob(self, digest: str) -> None:
        if self._bucket_blobs.pop(digest, None) is not None:
            self._forgotten[digest] = time.time()
            self._dirty = True

    async def load(self) -> None:
        """Read the snapshot, if there is one: an entry this release cannot read is skipped,
        a file that is no snapshot at all is set aside (`<snapshot>.bad-<time>`)."""
        found = await self._read_snapshot()
        if found is not None:
            self._tags, self._repos = found.tags, found.repos
            self._bucket_blobs, self._holdings = found.bucket_blobs, found.holdings

    async def _read_snapshot(self) -> Snapshot | None:
        """The snapshot file, unless it is missing, unreadable, or as last seen here."""
        if self._snapshot is None:
            return None
        try:
            read = await asyncio.to_thread(_read_snapshot, self._snapshot, self._seen)
        except FileNotFoundError:
            return None
        except Unreadable as exc:  # kept for a look, never written over
            aside = await asyncio.to_thread(_set_aside, self._snapshot, exc.stamp)
            if aside is not None:
                log.warning("unreadable metadata snapshot (%s) moved to %s", exc, aside)
            return None
        except OSError as exc:
            log.warning("cannot read metadata snapshot %s: %s", self._snapshot, exc)
            return None
        if read is None:
            return None
        found, self._seen = read
        if found.skipped:
            log.warning(
                "metadata snapshot %s: skipped %d entries this release cannot read",
                self._snapshot,
                found.skipped,
            )
        return found

    def _take_in(self, other: Snapshot) -> None:
        """Records another process saved: each kept where newer than ours, and fresh."""
        now = time.time()
        for key, record in other.tags.items():
            mine = self._tags.get(key)
            if record.is_fresh(self._expiry, now) and (
                mine is None or record.checked_at > mine.checked_at
            ):
                self._tags[key] = record
        self._repos = sorted(set(self._repos) | set(other.repos))
        self._forgotten = {d: at for d, at in self._forgotten.items() if now - at < self._expiry}
        for digest, (size, read_at) in other.bucket_blobs.items():
            mine_at = self._bucket_blobs.get(digest, (0, 0.0))[1]
            if read_at > max(mine_at, self._forgotten.get(digest, 0.0)):
                self._bucket_blobs[digest] = (size, read_at)
        for holder, held in other.holdings.items():
            ours = self._holdings.setdefault(holder, {})
            for digest, at in held.items():
                if now - at < self._expiry and at > ours.get(digest, 0.0):
                    ours[digest] = at

    async def save(self) -> None:
        """Write the snapshot when something changed since the last one. Saves take turns,
        each after the write before it, so the newest data is always written last."""
        if self._snapshot is None:
            return
        async with self._turn:
            if not self._dirty:
                return
            if self._writing is not None:
                await asyncio.gather(self._writing, return_exceptions=True)
            lock = await _turn_among_processes(self._snapshot)
            try:
                other = await self._read_snapshot()  # another process's save since ours
            except BaseException:
                _unlock(lock)
                raise
            if other is not None:
                self._take_in(other)
            self._dirty = False
            # Copied here, shallowly (C-speed, milliseconds for 100,000 records); filtered,
            # turned into JSON and written in a thread: built on the loop, 100,000 tags
            # held every request up 1.3 s every 30 s.
            copy = _Copy(
                dict(self._tags),
                list(self._repos),
                dict(self._bucket_blobs),
                {key: dict(held) for key, held in self._holdings.items()},
                self._expiry,
            )
            self._writing = asyncio.ensure_future(
                asyncio.to_thread(_write_copy, self._snapshot, copy)
            )
            # Held until the file is replaced, even when this save is cancelled meanwhile.
            self._writing.add_done_callback(lambda _: _unlock(lock))
            try:
                self._seen, stale = await asyncio.shield(self._writing)
            except OSError as exc:
                self._dirty = True
                log.warning("cannot write metadata snapshot %s: %s", self._snapshot, exc.strerror)
            else:
                self._forget(stale)

    def _forget(self, stale: list[Stale]) -> None:
        """Drop the holdings the snapshot left out as past their retention, unless
        recorded again since (memory stays bounded by what was recorded lately)."""
        for key, digest, at in stale:
            held = self._holdings.get(key)
            if held is not None and held.get(digest) == at:
                del held[digest]
                if not held:
                    del self._holdings[key]

    def _sweep_tags(self) -> None:
        """Drop the expired tag records, then those over the limit (the least lately written)."""
        now = time.time()
        fresh = [(key, r) for key, r in self._tags.items() if r.is_fresh(self._expiry, now)]
        self._tags = dict(_latest(fresh, self._limit))
        self._tags_sweep = _next_sweep(len(self._tags), self._limit)

    def _sweep_holdings(self) -> None:
        """Drop the holdings past their retention, then the repositories over the limit
        (the least lately written)."""
        self._drop_old_holdings()
        self._holdings = dict(_latest(list(self._holdings.items()), self._limit))
        self._holdings_sweep = _next_sweep(len(self._holdings), self._limit)

    def _drop_old_holdings(self) -> None:
        """Forget the digests held past their retention, and the repositories left with
        none (a key kept keeps its place: the order is still that of the writes)."""
        oldest = time.time() - self._expiry
        for key, held in list(self._holdings.items()):
            kept = {digest: at for digest, at in held.items() if at > oldest}
            if kept:
                self._holdings[key] = kept
            else:
                del self._holdings[key]

    async def close(self) -> None:
        await self.save()
        if self._writing is not None:  # nothing changed since a save that was cancelled
            await asyncio.gather(self._writing, return_exceptions=True)


def _latest(entries: list[T], limit: int | None) -> list[T]:
    """The last `limit` of `entries` (all without a limit)."""
    return entries if limit is None else entries[max(len(entries) - limit, 0) :]


def _next_sweep(size: int, limit: int | None) -> int:
    """The size at which entries now numbering `size` are swept next (see SWEEP_MIN)."""
    doubled = max(2 * size, SWEEP_MIN)
    return doubled if limit is None else min(doubled, limit + max(limit // 4, 1))


async def _turn_among_processes(snapshot: Path) -> int | None:
    """The snapshot's lock, taken in a thread (a save cancelled while it waits lets it go
    once got)."""
    taking = asyncio.ensure_future(asyncio.to_thread(_lock_snapshot, snapshot))
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        taking.add_done_callback(lambda got: None if got.cancelled() else _unlock(got.result()))
        raise


def _lock_snapshot(snapshot: Path) -> int | None:
    """An exclusive flock on the snapshot's lock file (blocking, at most LOCK_WAIT); None
    when not had: a save goes ahead without it rather than never."""
    try:
        fd = os.open(f"{snapshot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("metadata snapshot saved unlocked: %s", exc.strerror)
        return None
    deadline = time.monotonic() + LOCK_WAIT
    while not try_lock(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            log.warning("metadata snapshot saved unlocked: its lock held over %ss", LOCK_WAIT)
            return None
        time.sleep(LOCK_POLL)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _stamp(found: os.stat_result) -> Stamp:
    return (found.st_ino, found.st_size, found.st_mtime_ns)


class Unreadable(ValueError):
    """A snapshot file that is not one at all (not JSON, or not shaped as one)."""

    def __init__(self, stamp: Stamp, reason: str) -> None:
        super().__init__(reason)
        self.stamp = stamp


def _read_snapshot(path: Path, seen: Stamp | None) -> tuple[Snapshot, Stamp] | None:
    """The snapshot at `path` and its stamp; None when its stamp is `seen` (blocking)."""
    with open(path, encoding="utf-8") as file:
        stamp = _stamp(os.fstat(file.fileno()))
        if stamp == seen:
            return None
        try:
            data = json.load(file)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise Unreadable(stamp, str(exc)) from exc
    found = _snapshot_from(data)
    if found is None:
        raise Unreadable(stamp, "not shaped as a metadata snapshot")
    return found, stamp


def _snapshot_from(data: object) -> Snapshot | None:
    """The snapshot in parsed JSON, each entry read alone: one this release cannot use (as
    another release may write, or damaged) is skipped and counted, the rest kept. None when
    `data` is not a snapshot at all."""
    if not isinstance(data, dict):
        return None
    tags, repos = data.get("tags"), data.get("repositories")
    blobs, holdings = data.get("bucket_blobs", {}), data.get("holdings", [])
    if not (isinstance(tags, list) and isinstance(repos, list)):
        return None
    if not (isinstance(blobs, dict) and isinstance(holdings, list)):
        return None
    names = [repo for repo in repos if isinstance(repo, str)]
    tag_entries = [_tag_entry(entry) for entry in tags]
    read_entries = [_read_entry(digest, read) for digest, read in blobs.items()]
    held_entries = [_holdings_entry(entry) for entry in holdings]
    entries: list[object] = [*tag_entries, *read_entries, *held_entries]
    return Snapshot(
        tags=dict(entry for entry in tag_entries if entry is not None),
        repos=sorted(set(names)),
        bucket_blobs=dict(entry for entry in read_entries if entry is not None),
        holdings=dict(entry for entry in held_entries if entry is not None),
        skipped=len(repos) - len(names) + entries.count(None),
    )


def _tag_entry(entry: object) -> tuple[tuple[str, str, str], TagRecord] | None:
    if not isinstance(entry, dict):
        return None
    upstream, repo, tag = _text(entry, "upstream"), _text(entry, "repo"), _text(entry, "tag")
    record = TagRecord.from_data(entry.get("record"))  # unknown fields ignored
    if upstream is None or repo is None or tag is None or record is None:
        return None
    return (upstream, repo, tag), record


def _read_entry(digest: str, read: object) -> tuple[str, tuple[int, float]] | None:
    """A bucket blob's [size, last read]."""
    if not (isinstance(read, list) and len(read) == 2 and all(map(_is_number, read))):
        return None
    return digest, (int(read[0]), float(read[1]))


def _holdings_entry(entry: object) -> tuple[tuple[str, str], dict[str, float]] | None:
    if not isinstance(entry, dict):
        return None
    upstream, repo, digests = _text(entry, "upstream"), _text(entry, "repo"), entry.get("digests")
    if upstream is None or repo is None or not isinstance(digests, dict):
        return None
    if not all(_is_number(at) for at in digests.values()):
        return None
    return (upstream, repo), {str(digest): float(at) for digest, at in digests.items()}


def _text(entry: dict[str, object], name: str) -> str | None:
    value = entry.get(name)
    return value if isinstance(value, str) else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _set_aside(path: Path, stamp: Stamp) -> Path | None:
    """Rename the unreadable snapshot `path` beside itself, unless another process replaced
    it since it was read (stamp); only the newest BAD_KEPT are kept (blocking)."""
    try:
        if _stamp(os.stat(path)) != stamp:
            return None
        now = time.time_ns()  # in names that sort as they were set aside
        when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
        aside = path.with_name(f"{path.name}.bad-{when}.{now % 10**9:09d}Z")
        os.rename(path, aside)
        old = sorted(path.parent.glob(f"{path.name}.bad-*"))[:-BAD_KEPT]
        for found in old:
            found.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot set the unreadable metadata snapshot %s aside: %s", path, exc)
        return None
    return aside


@dataclass(frozen=True, slots=True)
class _Copy:
    """What a snapshot holds, copied on the loop for a thread to write."""

    tags: dict[tuple[str, str, str], TagRecord]
    repos: list[str]
    bucket_blobs: dict[str, tuple[int, float]]
    holdings: dict[tuple[str, str], dict[str, float]]
    expiry: float


def _write_copy(path: Path, copy: _Copy) -> tuple[Stamp, list[Stale]]:
    """The snapshot of `copy` written (blocking): its stamp, and the holdings it left out
    as past their retention."""
    now = time.time()
    oldest = now - copy.expiry
    stale = [
        (key, digest, at)
        for key, held in copy.holdings.items()
        for digest, at in held.items()
        if at <= oldest
    ]
    tags = (
        {"upstream": u, "repo": r, "tag": t, "record": asdict(record)}
        for (u, r, t), record in copy.tags.items()
        if record.is_fresh(copy.expiry, now)
    )
    holdings = (
        {"upstream": upstream, "repo": repo, "digests": fresh}
        for (upstream, repo), held in copy.holdings.items()
        if (fresh := {digest: at for digest, at in held.items() if at > oldest})
    )
    # Entry by entry: one json.dumps of it all holds the GIL, and so the event loop, for
    # the whole of it (0.5 s for 100,000 tags); between entries the loop gets its turns.
    text = (
        f'{{"tags": [{",".join(map(json.dumps, tags))}], '
        f'"repositories": {json.dumps(copy.repos)}, '
        f'"bucket_blobs": {{{",".join(map(_member, copy.bucket_blobs.items()))}}}, '
        f'"holdings": [{",".join(map(json.dumps, holdings))}]}}'
    )
    return _write_snapshot(path, text), stale


def _member(item: tuple[str, object]) -> str:
    """One `"key": value` of a JSON object."""
    return f"{json.dumps(item[0])}: {json.dumps(item[1])}"


def _write_snapshot(path: Path, text: str) -> Stamp:
    """Replace the snapshot with `text`; the new file's stamp (blocking). What a save
    killed mid-write left beside it goes too (a save takes milliseconds)."""
    stamp = _stamp(write_replacing(path, text, durable=True))
    remove_stale_temps(path, STALE_TEMP)
    return stamp
