"""Manifests: bytes by digest on disk, tag → digest with a TTL in the metadata store.

Within `tag_ttl` a tag is answered with no upstream contact. After it, a HEAD revalidates
(Docker Hub does not count a HEAD against the pull limit) and a GET is spent only when the
digest changed and its bytes are not cached yet. A HEAD from a client never costs a GET.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from mirror.config import CacheConfig
from mirror.errors import ManifestUnknown, TooManyRequests, UpstreamUnavailable
from mirror.lru import LRU
from mirror.metadata import MetadataStore, TagRecord
from mirror.metrics import Metrics
from mirror.reference import is_digest_reference, parse_digest, validate_tag
from mirror.singleflight import SingleFlight
from mirror.storage import CacheStore
from mirror.upstream import ManifestInfo, Upstream

# Hot manifests and tag records are kept in process memory: a pull storm for one tag is
# then answered without a Redis round trip or a thread hop to read the file. Manifests are
# immutable (keyed by digest); a tag record still carries `checked_at`, so the TTL holds.
HOT_MANIFEST_BYTES = 64 * 1024 * 1024
HOT_TAGS = 10000


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest to answer with; `body` is None for a HEAD."""

    digest: str
    media_type: str
    size: int
    body: bytes | None
    stale: bool = False  # served past its TTL because the upstream failed


def parse_accept(values: list[str]) -> list[str]:
    """Media types from every Accept header line, parameters (`;q=`) dropped."""
    types = []
    for value in values:
        for part in value.split(","):
            media_type = part.partition(";")[0].strip()
            if media_type:
                types.append(media_type)
    return types


def acceptable(media_type: str, accept: list[str]) -> bool:
    """No Accept, or `*/*`, accepts anything; otherwise the type must be listed."""
    return not accept or media_type in accept or "*/*" in accept


class ManifestService:
    """Answers manifest GETs and HEADs from the cache, asking upstream only when needed."""

    def __init__(
        self, storage: CacheStore, metadata: MetadataStore, metrics: Metrics, cache: CacheConfig
    ) -> None:
        self._storage = storage
        self._metadata = metadata
        self._metrics = metrics
        self._tag_ttl = cache.tag_ttl
        self._stale_if_error = cache.stale_if_error
        self._hot: LRU[str, tuple[str, bytes]] = LRU(HOT_MANIFEST_BYTES, lambda v: len(v[1]))
        self._tags: LRU[tuple[str, str, str], TagRecord] = LRU(HOT_TAGS)
        # Concurrent misses and revalidations of one manifest make one upstream request.
        self._flight = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def get(
        self, upstream: Upstream, repo: str, reference: str, accept: list[str], *, head: bool
    ) -> Manifest:
        if is_digest_reference(reference):
            return await self._by_digest(upstream, repo, reference, accept, head=head)
        return await self._by_tag(upstream, repo, validate_tag(reference), accept, head=head)

    async def _by_digest(
        self, upstream: Upstream, repo: str, reference: str, accept: list[str], *, head: bool
    ) -> Manifest:
        cached = self._hot.get(reference)
        if cached is None:
            cached = await self._storage.read_manifest(parse_digest(reference))
            if cached is not None:
                self._hot.put(reference, cached)
        if cached is not None:
            self._metrics.cache_requests.labels("manifest", "hit").inc()
            media_type, stored = cached
            _check_acceptable(media_type, accept, reference)
            return Manifest(reference, media_type, len(stored), None if head else stored)
        self._metrics.cache_requests.labels("manifest", "miss").inc()
        key = ("digest", upstream.name, reference, head, _accept_key(accept))
        return await self._flight.do(
            key, lambda: self._fetch_digest(upstream, repo, reference, accept, head=head)
        )

    async def _fetch_digest(
        self, upstream: Upstream, repo: str, reference: str, accept: list[str], *, head: bool
    ) -> Manifest:
        info, body = await upstream.manifest(repo, reference, accept, head=head)
        if body is not None:
            if info.digest != reference:
                raise ManifestUnknown(f"upstream sent another manifest for {reference}")
            await self._store(upstream, repo, info, body)
        return Manifest(reference, info.media_type, info.size, body)

    async def _by_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: list[str], *, head: bool
    ) -> Manifest:
        ttl = self._tag_ttl if upstream.tag_ttl is None else upstream.tag_ttl
        record = await self._get_tag(upstream.name, repo, tag, ttl)
        if record is not None and not acceptable(record.media_type, accept):
            raise ManifestUnknown(f"manifest {repo}:{tag} is not of an accepted type")
        if record is not None and record.is_fresh(ttl):
            self._metrics.cache_requests.labels("tag", "hit").inc()
            return await self._answer(upstream, repo, record, accept, head=head)
        self._metrics.cache_requests.labels("tag", "miss").inc()
        if record is not None:
            try:
                fresh = await self._flight.do(
                    ("revalidate", upstream.name, repo, tag, _accept_key(accept)),
                    lambda: self._revalidate(upstream, repo, tag, record, accept),
                )
            except (UpstreamUnavailable, TooManyRequests):
                if not record.is_fresh(ttl + self._stale_if_error):
                    raise
                self._metrics.stale_served.labels("tag").inc()
                answer = await self._answer(upstream, repo, record, accept, head=head)
                return replace(answer, stale=True)
            return await self._answer(upstream, repo, fresh, accept, head=head)
        return await self._flight.do(
            ("tag", upstream.name, repo, tag, head, _accept_key(accept)),
            lambda: self._fetch_tag(upstream, repo, tag, accept, head=head),
        )

    async def _fetch_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: list[str], *, head: bool
    ) -> Manifest:
        """Resolve an unknown tag upstream (HEAD for a HEAD: it costs no pull)."""
        info, body = await upstream.manifest(repo, tag, accept, head=head)
        if not info.digest.startswith("sha256:"):
            # A HEAD without Docker-Content-Digest says nothing cacheable: ask with a GET.
            info, body = await upstream.manifest(repo, tag, accept, head=False)
        record = TagRecord(info.digest, info.media_type, info.size, time.time())
        if body is not None:
            await self._store(upstream, repo, info, body)
        await self._put_tag(upstream.name, repo, tag, record)
        return Manifest(info.digest, info.media_type, info.size, None if head else body)

    async def _revalidate(
        self, upstream: Upstream, repo: str, tag: str, record: TagRecord, accept: list[str]
    ) -> TagRecord:
        """HEAD the tag upstream; a fresh record, with a new digest when it moved."""
        try:
            info, _ = await upstream.manifest(repo, tag, accept, head=True)
        except (UpstreamUnavailable, TooManyRequests):
            self._metrics.revalidations.labels("error").inc()
            raise
        if not info.digest.startswith("sha256:"):
            info, body = await upstream.manifest(repo, tag, accept, head=False)
            if body is not None:
                await self._store(upstream, repo, info, body)
        changed = info.digest != record.digest
        self._metrics.revalidations.labels("changed" if changed else "unchanged").inc()
        fresh = TagRecord(info.digest, info.media_type or record.media_type, info.size, time.time())
        await self._put_tag(upstream.name, repo, tag, fresh)
        return fresh

    async def _answer(
        self, upstream: Upstream, repo: str, record: TagRecord, accept: list[str], *, head: bool
    ) -> Manifest:
        """Answer from a tag record: HEAD from the record alone, GET from the stored bytes."""
        if head:
            return Manifest(record.digest, record.media_type, record.size, None)
        return await self._by_digest(upstream, repo, record.digest, accept, head=False)

    async def _get_tag(self, upstream: str, repo: str, tag: str, ttl: float) -> TagRecord | None:
        """The local record while fresh, else the shared store's (another replica may
        have revalidated it since)."""
        record = self._tags.get((upstream, repo, tag))
        if record is not None and record.is_fresh(ttl):
            return record
        record = await self._metadata.get_tag(upstream, repo, tag)
        if record is not None:
            self._tags.put((upstream, repo, tag), record)
        return record

    async def _put_tag(self, upstream: str, repo: str, tag: str, record: TagRecord) -> None:
        self._tags.put((upstream, repo, tag), record)
        await self._metadata.put_tag(upstream, repo, tag, record)

    async def _store(self, upstream: Upstream, repo: str, info: ManifestInfo, body: bytes) -> None:
        self._hot.put(info.digest, (info.media_type, body))
        try:
            written = await self._storage.write_manifest(
                parse_digest(info.digest), info.media_type, body
            )
        except OSError as exc:  # a full or read-only disk: answer from memory anyway
            self._storage.mark_unwritable(exc)
            written = False
        if written:
            self._metrics.cache_size.inc(len(body))
            self._metrics.cache_objects.inc()
        await self._metadata.add_repository(upstream.catalog_prefix + repo)


def _accept_key(accept: list[str]) -> tuple[str, ...]:
    return tuple(sorted(set(accept)))


def _check_acceptable(media_type: str, accept: list[str], reference: str) -> None:
    if not acceptable(media_type, accept):
        raise ManifestUnknown(f"manifest {reference} is not of an accepted type")
