"""What the metadata store holds (tag records, holdings, the catalogue, bucket reads), its keys.

A tag record says which digest a tag pointed at and when the upstream last confirmed it.
Freshness is judged from `checked_at` against `cache.tag_ttl` by the caller; the store
itself only keeps records for `RETENTION` beyond that, so an expired tag can still be
served when the upstream is down, and a tag nobody asks for eventually goes away.

Replicas of two releases share one Redis during a rolling update, so every record is read
tolerantly: fields it does not know are ignored, and a record it cannot use (a required
field missing or of the wrong type) is taken as absent (the tag is asked upstream again),
never as an error. The schema is `SCHEMA_VERSION`: a record without "v" is version 1. The
release before this one built TagRecord from every field and refused any extra, so version
1 records are written with exactly its fields and no "v"; a later version may add optional
fields (and "v") once no such replica can be running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, runtime_checkable

# Every key starts with this, so the mirror can share a Redis with other tenants.
KEY_PREFIX = "mirror:"
# One key per tag record (no hash tag: each is read and written alone, so a Cluster spreads
# them over its masters). The braces are str.format fields, never part of a key: names and
# tags cannot hold them (OCI grammar).
TAG_PREFIX = KEY_PREFIX + "tag:"
TAG_KEY = TAG_PREFIX + "{upstream}:{repo}:{tag}"
TAG_PATTERN = TAG_PREFIX + "*"
# An upstream token per (realm, service, account, scopes) hash, expiring with the token.
TOKEN_PREFIX = KEY_PREFIX + "token:"
# Which digests each repository is known to hold (cache/holdings.py): one sorted set per
# (upstream, repository), digest → when it was last recorded. One key per repository, so a
# Cluster spreads them over its masters and each check or record touches one slot; entries
# older than the retention are trimmed whenever the set is written, and the key expires
# with its newest entry, so a repository nobody pulls any more goes away like its tags.
HOLDINGS_PREFIX = KEY_PREFIX + "holds:"
HOLDINGS_KEY = HOLDINGS_PREFIX + "{upstream}:{repo}"
# A sorted set with every score 0: Redis orders it lexically, which is the order
# `_catalog` must page in (ZRANGEBYLEX), with no sorting on our side.
REPOS_KEY = KEY_PREFIX + "repos"
# A hash of digest → "size last-read-time" for the blobs in the S3 bucket (storage.s3).
BUCKET_BLOBS_KEY = KEY_PREFIX + "bucket-blobs"
# The record layout this code writes and fully understands (see the module docstring).
SCHEMA_VERSION = 1
# How long a tag record outlives its TTL by default (cache.stale_if_error): a week of
# serving stale through an outage.
RETENTION = 7 * 86400


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag resolved to upstream, and when that was last confirmed."""

    digest: str
    media_type: str
    size: int
    checked_at: float

    def is_fresh(self, ttl: float, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.checked_at < ttl

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> TagRecord | None:
        """The record in `raw`, its unknown fields ignored; None when it is unusable."""
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: object) -> TagRecord | None:
        """The record in parsed JSON `data`, read as `from_json` reads one."""
        if not isinstance(data, dict):
            return None
        return _tag_record(data)


_TAG_TYPES: dict[str, tuple[type, ...]] = {
    "digest": (str,),
    "media_type": (str,),
    "size": (int,),
    "checked_at": (int, float),
}


def _tag_record(data: dict[str, Any]) -> TagRecord | None:
    values: dict[str, Any] = {field.name: data.get(field.name) for field in fields(TagRecord)}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, _TAG_TYPES[name]):
            return None
    return TagRecord(**values)


class MetadataStore(Protocol):
    """Where tag records and the catalogue live."""

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None: ...

    async def put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None: ...

    async def add_repository(self, repo: str) -> None: ...

    # Holdings: digests the repository of an upstream is known to hold, recorded `at`.
    async def add_holdings(
        self, upstream: str, repo: str, digests: Sequence[str], at: float
    ) -> None: ...

    async def holds(self, upstream: str, repo: str, digest: str) -> bool: ...

    async def repositories(self, n: int, last: str | None) -> list[str]: ...

    async def tags(self) -> list[tuple[str, str, str, TagRecord]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # The S3 bucket's blobs (storage.s3): size and last-read time, for its eviction.
    async def put_blob_read(self, digest: str, size: int, read_at: float) -> None: ...

    async def blob_reads(self) -> dict[str, tuple[int, float]]: ...

    async def get_blob_read(self, digest: str) -> tuple[int, float] | None: ...

    # A read moves an existing record's last read on; a record another process dropped (it
    # evicted the blob) stays dropped. The record's size, None when there is none.
    async def touch_blob_read(self, digest: str, read_at: float) -> int | None: ...

    async def forget_blob(self, digest: str) -> None: ...


@runtime_checkable
class TokenStore(Protocol):
    """Upstream tokens the processes of one mirror share (by a hash of realm, service,
    account and scope), so that one fetch serves them all until shortly before expiry."""

    async def get_token(self, key: str) -> tuple[str, float] | None: ...

    async def put_token(self, key: str, token: str, expires_at: float) -> None: ...


def tag_key(upstream: str, repo: str, tag: str) -> str:
    return TAG_KEY.format(upstream=upstream, repo=repo, tag=tag)


def holdings_key(upstream: str, repo: str) -> str:
    return HOLDINGS_KEY.format(upstream=upstream, repo=repo)
