"""Manifests: bytes by digest on disk, tag → digest with a TTL in the metadata store.

Within `tag_ttl` a tag is answered with no upstream contact. After it, a HEAD revalidates
(Docker Hub does not count a HEAD against the pull limit) and a GET is spent only when the
digest changed and its bytes are not cached yet. A HEAD from a client never costs a GET.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror.cache.holdings import MANIFEST, Holdings, references
from mirror.cluster.lease import HeldLease, LeaseSource
from mirror.cluster.shared import SharedFailure, SharedWork
from mirror.config import CacheConfig
from mirror.metadata.store import MetadataStore, TagRecord
from mirror.observe.logs import FailureLog
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    BlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from mirror.oci.negotiation import MANIFEST_TYPES, Verdict, decide, default_platform
from mirror.oci.reference import (
    as_digest,
    compute_digest,
    is_digest_reference,
    parse_digest,
    validate_tag,
)
from mirror.storage import CacheStore
from mirror.upstream.client import ManifestInfo, Upstream
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

# Hot manifests and tag records are kept in process memory: a pull storm for one tag is
# then answered without a Redis round trip or a thread hop to read the file. Manifests are
# immutable (keyed by digest); a tag record still carries `checked_at`, so the TTL holds.
HOT_MANIFEST_BYTES = 64 * 1024 * 1024
HOT_TAGS = 10000
# The upstream is always asked for every type: one tag is one cached object, whatever the
# client, and negotiation.py decides what each client gets from it.
ALL_TYPES = sorted(MANIFEST_TYPES)
# What a failed revalidation may end in while the tag's kept answer is served stale (within
# stale_if_error), by the reason it is counted under: the upstream down or rate limited, and
# also refusing the mirror (a revoked token, a rotated password, a WAF's 403) or sending no
# manifest: none of them says the tag is gone. Only ManifestUnknown (it is) ends the answer.
# The upstream's 401 and 403 only: the mirror's own Unauthorized and Denied never get here.
STALE_REASONS: tuple[tuple[type[RegistryError], str], ...] = (
    (TooManyRequests, "rate_limited"),
    (UpstreamUnauthorized, "unauthorized"),
    (UpstreamDenied, "denied"),
    (ManifestInvalid, "invalid"),
    (UpstreamUnavailable, "unavailable"),
)
STALE_ON = tuple(kind for kind, _ in STALE_REASONS)


def _failed_elsewhere(error: str) -> Exception:
    if error == TooManyRequests.__name__:
        return TooManyRequests("upstream rate limit reached (seen by another replica)")
    if error == ManifestUnknown.__name__:
        return ManifestUnknown("manifest not found upstream (asked by another replica)")
    if error == NameUnknown.__name__:
        return NameUnknown("repository not known upstream (asked by another replica)")
    if error == BlobUnknown.__name__:
        return BlobUnknown("blob not found upstream (asked by another replica)")
    return UpstreamUnavailable("the upstream failed for another replica just now")


# With replicas, what the upstream answered the lease holder (down, rate limited, no such
# manifest) is its waiters' answer too, at once (a stale tag is then served where one is
# kept), rather than each replica asking again in turn.
UPSTREAM_FAILED = SharedFailure(
    (UpstreamUnavailable, TooManyRequests, ManifestUnknown), _failed_elsewhere
)
# The same for what else one replica asks the upstream for all: a tag list, referrers, the
# size of a blob not cached (404s: no such repository, no such blob).
LOOKUP_FAILED = SharedFailure(
    (UpstreamUnavailable, TooManyRequests, NameUnknown, BlobUnknown), _failed_elsewhere
)


@dataclass(slots=True)  # not frozen: made on every manifest request, and frozen costs 4x
class Manifest:
    """A manifest to answer with; `body` is None for a HEAD."""

    digest: str
    media_type: str
    size: int
    body: bytes | None
    stale: bool = False  # served past its TTL because the upstream failed
    # By tag: seconds left of the tag's TTL (how long a cache may keep this answer).
    fresh_for: float | None = None
    # By tag: the manifest list this one was picked from, for a client reading no lists.
    index: str | None = None

    def lasting(
        self, fresh_for: float | None, stale: bool = False, index: str | None = None
    ) -> Manifest:
        """This answer under a tag's freshness (dataclasses.replace, without its cost on
        every manifest request)."""
        return Manifest(self.digest, self.media_type, self.size, self.body, stale, fresh_for, index)


class ManifestService:
    """Answers manifest GETs and HEADs from the cache, asking upstream only when needed."""

    def __init__(
        self,
        storage: CacheStore,
        metadata: MetadataStore,
        metrics: Metrics,
        cache: CacheConfig,
        holdings: Holdings,
        leases: LeaseSource[HeldLease] | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        self._storage = storage
        # Stale answers are logged in the rate-limited log of upstream failures: no client
        # sees the error, and a refusal of the mirror's credentials lasts until someone acts.
        self._failures = failures
        self._metadata = metadata
        self._metrics = metrics
        self._holdings = holdings
        self._tag_ttl = cache.tag_ttl
        self._stale_if_error = cache.stale_if_error
        self._hot: LRU[str, tuple[str, bytes]] = LRU(HOT_MANIFEST_BYTES, lambda v: len(v[1]))
        self._tags: LRU[tuple[str, str, str], TagRecord] = LRU(HOT_TAGS)
        # The answer by tag, beside the tag record it came from: while that record is the
        # one held, and fresh, the answer stands (a digest's bytes never change), and the
        # request every pull starts with skips the look-ups that made it.
        # Bounded by bytes like `_hot`, whose bodies it mostly shares, with a kilobyte for
        # each entry's own keep.
        self._answers: LRU[tuple[str, str, str, bool], tuple[TagRecord, Manifest]] = LRU(
            HOT_MANIFEST_BYTES, lambda kept: len(kept[1].body or b"") + 1024
        )
        # A manifest asked for by another algorithm's digest (sha512): the sha256 it is
        # kept, recorded and judged by, once its bytes were checked against the one asked.
        self._aliases: LRU[str, str] = LRU(HOT_TAGS)
        # Concurrent misses and revalidations of one manifest make one upstream request.
        self._flight = SingleFlight()
        # ... and with replicas, one upstream request across all of them (a lease each).
        self._shared = SharedWork(leases, metrics.cluster)
        # The series every request counts in, looked up once.
        requests = metrics.cache_requests
        self._tag_hit = requests.labels("tag", "hit")
        self._tag_miss = requests.labels("tag", "miss")
        self._manifest_hit = requests.labels("manifest", "hit")
        self._manifest_miss = requests.labels("manifest", "miss")
        # Told the size of each manifest file written (the evictor counts the cache's size).
        self.on_stored: Callable[[int], None] | None = None

    async def close(self) -> None:
        await self._flight.close()

    async def get(
        self, upstream: Upstream, repo: str, reference: str, accept: tuple[str, ...], *, head: bool
    ) -> Manifest:
        """The manifest this client gets for `reference` with its Accept (negotiation.py)."""
        by_tag = not is_digest_reference(reference)
        if by_tag:
            found = self._standing(upstream, repo, reference, head) or await self._by_tag(
                upstream, repo, validate_tag(reference), head=head
            )
        else:
            found = self._standing_digest(upstream, repo, reference, head) or (
                await self._by_digest(upstream, repo, reference, head=head, held=False)
            )
        if decide(found.media_type, accept, by_tag=by_tag) is Verdict.SERVE:
            return found
        # A manifest list for a client that reads only single manifests: the default
        # platform's, still under the tag's freshness. A list names any digest it likes (a
        # registry need not check its children): the child is held, fetched or confirmed
        # under this repository like any manifest asked for by digest.
        body = found.body
        if body is None:
            body = (await self._by_digest(upstream, repo, found.digest, head=False)).body
        child = await self._by_digest(
            upstream, repo, default_platform(body or b""), head=head, held=False
        )
        decide(child.media_type, accept, by_tag=False)
        return child.lasting(found.fresh_for, found.stale, index=found.digest)

    def ttl_of(self, upstream: Upstream) -> float:
        """How long a tag of this upstream is believed without asking it again."""
        return self._tag_ttl if upstream.tag_ttl is None else upstream.tag_ttl

    @property
    def stale_if_error(self) -> float:
        return self._stale_if_error

    @property
    def shared(self) -> SharedWork:
        """Work done once across replicas (tag lists, referrers and blob sizes too)."""
        return self._shared

    @property
    def metadata(self) -> MetadataStore:
        return self._metadata

    async def remember(
        self,
        upstream: Upstream,
        repo: str,
        key: str,
        media_type: str,
        body: bytes,
        digest: str | None = None,
    ) -> TagRecord:
        """Keep a document the mirror composed (a referrers index) by its digest (`digest`,
        when the caller hashed it already), and `key` pointing at it like a tag, under the
        same TTL and stale rules."""
        info = ManifestInfo(digest or str(compute_digest(body)), media_type, len(body))
        # Not in _catalog on its own: a tag list or an empty referrers answer is no content.
        await self._store(upstream, repo, info, body, catalog=False)
        record = TagRecord(info.digest, media_type, len(body), time.time())
        await self._put_tag(upstream.name, repo, key, record)
        return record

    async def recall(
        self, upstream: Upstream, repo: str, key: str
    ) -> tuple[TagRecord, bytes] | None:
        """What `remember` kept under `key`, fresh or not; None when it or its bytes are gone."""
        record = await self._get_tag(upstream.name, repo, key, self.ttl_of(upstream))
        if record is None:
            return None
        cached = await self._read_cached(record.digest)
        return None if cached is None else (record, cached[1])

    async def _read_cached(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, bytes) of a stored manifest: from memory, else from storage (then
        kept in memory); None when not stored (or `digest` is no digest)."""
        cached = self._hot.get(digest)
        if cached is None and (parsed := as_digest(digest)) is not None:
            cached = await self._storage.read_manifest(parsed)
            if cached is not None:
                self._hot.put(digest, cached)
        return cached

    async def _by_digest(
        self, upstream: Upstream, repo: str, reference: str, *, head: bool, held: bool = True
    ) -> Manifest:
        """The manifest by digest; unless `held` (a tag of the repository points at it),
        only once the repository is known to hold it (cache/holdings.py)."""
        if parse_digest(reference).algorithm != "sha256":  # DigestInvalid for one that is none
            return await self._by_alias(upstream, repo, reference, head=head)
        cached = await self._read_cached(reference)
        if not held:
            held = await self._holdings.known(upstream.name, repo, reference)
        elif cached is not None:  # the tag vouches for the digest, not for bytes from elsewhere
            held = await self._holdings.sent(upstream.name, reference)
        if cached is not None:
            if not held:
                await self._confirm_cached(upstream, repo, reference)
            self._manifest_hit.inc()
            media_type, stored = cached
            return Manifest(reference, media_type, len(stored), None if head else stored)
        self._manifest_miss.inc()
        # Per repository: a fetch under another one is no answer for this one.
        key = ("digest", upstream.name, repo, reference, head)
        if head:  # a HEAD stores nothing another replica could read: no lease
            return await self._flight.do(
                key, lambda: self._fetch_digest(upstream, repo, reference, head=True)
            )
        return await self._flight.do(
            key,
            lambda: self._shared.once(
                "manifest",
                # Per repository, as the holder's fetch answers for its repository alone.
                f"manifest:{upstream.name}/{repo}@{reference}",
                lambda: self._stored_for(upstream, repo, reference),
                lambda: self._fetch_digest(upstream, repo, reference, head=False),
                UPSTREAM_FAILED,
            ),
        )

    async def _by_alias(
        self, upstream: Upstream, repo: str, reference: str, *, head: bool
    ) -> Manifest:
        """The manifest by a digest of another algorithm than the cache's, answered as its
        sha256: so a deny naming the sha256 refuses it too (web/gate.py), and the bytes are
        kept once. A HEAD costs one GET the first time: the sha256 needs the bytes."""
        canonical = self._aliases.get(reference)
        if canonical is not None:
            try:
                return await self._by_digest(upstream, repo, canonical, head=head, held=False)
            except RegistryError as exc:  # as a cold miss words it: no sha256 told
                exc.message = exc.message.replace(canonical, reference)
                exc.args = (exc.message,)
                raise
        self._manifest_miss.inc()
        key = ("alias", upstream.name, repo, reference)
        found = await self._flight.do(key, lambda: self._fetch_alias(upstream, repo, reference))
        return Manifest(found.digest, found.media_type, found.size, None if head else found.body)

    async def _fetch_alias(self, upstream: Upstream, repo: str, reference: str) -> Manifest:
        info, body = await upstream.manifest(repo, reference, ALL_TYPES, head=False)
        asked = parse_digest(reference)
        if body is None or compute_digest(body, asked.algorithm) != asked:
            raise ManifestUnknown(f"upstream sent another manifest for {reference}")
        await self._store(upstream, repo, info, body)
        self._aliases.put(reference, info.digest)
        return Manifest(info.digest, info.media_type, info.size, body)

    async def _confirm_cached(self, upstream: Upstream, repo: str, reference: str) -> None:
        """Holdings.confirm for a cached manifest; a refusal is this request's cache miss,
        as for a digest never pulled, so /metrics tells no client what others pulled."""
        try:
            await self._holdings.confirm(upstream, repo, reference, MANIFEST)
        except BaseException:
            self._manifest_miss.inc()
            raise

    async def _stored_for(self, upstream: Upstream, repo: str, reference: str) -> Manifest | None:
        """The manifest another replica stored, once the repository is known to hold it (the
        holder of this repository's lease records that before it lets go)."""
        if not await self._holdings.known(upstream.name, repo, reference):
            return None
        return await self._stored(reference)

    async def _stored(self, reference: str) -> Manifest | None:
        """The manifest as another replica stored it, if it did (a shared storage)."""
        cached = await self._storage.read_manifest(parse_digest(reference))
        if cached is None:
            return None
        self._hot.put(reference, cached)
        media_type, stored = cached
        return Manifest(reference, media_type, len(stored), stored)

    async def _fetch_digest(
        self, upstream: Upstream, repo: str, reference: str, *, head: bool
    ) -> Manifest:
        info, body = await upstream.manifest(repo, reference, ALL_TYPES, head=head)
        if head and not (info.media_type and info.size):  # no type or no length: a GET says
            info, body = await upstream.manifest(repo, reference, ALL_TYPES, head=False)
        if body is None:
            await self._holdings.record(upstream.name, repo, [reference])
        else:
            if info.digest != reference:
                raise ManifestUnknown(f"upstream sent another manifest for {reference}")
            await self._store(upstream, repo, info, body)
        return Manifest(reference, info.media_type, info.size, None if head else body)

    async def _by_tag(self, upstream: Upstream, repo: str, tag: str, *, head: bool) -> Manifest:
        ttl = self.ttl_of(upstream)
        record = await self._get_tag(upstream.name, repo, tag, ttl)
        if record is not None and record.is_fresh(ttl):
            self._tag_hit.inc()
            answer = await self._answer(upstream, repo, record, head=head)
            self._answers.put((upstream.name, repo, tag, head), (record, answer))
            return answer.lasting(ttl - (time.time() - record.checked_at))
        self._tag_miss.inc()
        if record is not None:
            try:
                fresh = await self._flight.do(
                    ("revalidate", upstream.name, repo, tag),
                    lambda: self._shared.once(
                        "tag",
                        tag_lease(upstream.name, repo, tag),
                        lambda: self._shared_tag(upstream.name, repo, tag, record.checked_at),
                        lambda: self._revalidate(upstream, repo, tag, record),
                        UPSTREAM_FAILED,
                    ),
                )
            except STALE_ON as exc:
                if not record.is_fresh(ttl + self._stale_if_error):
                    raise
                return await self._stale(upstream, repo, tag, record, exc, head=head)
            answer = await self._answer(upstream, repo, fresh, head=head)
            return answer.lasting(ttl)
        found = await self._flight.do(
            ("tag", upstream.name, repo, tag, head),
            lambda: self._shared.once(
                "tag",
                tag_lease(upstream.name, repo, tag),
                lambda: self._resolved_elsewhere(upstream, repo, tag, head=head),
                lambda: self._fetch_tag(upstream, repo, tag, head=head),
                UPSTREAM_FAILED,
            ),
        )
        return found.lasting(ttl)

    async def _stale(
        self,
        upstream: Upstream,
        repo: str,
        tag: str,
        record: TagRecord,
        error: RegistryError,
        *,
        head: bool,
    ) -> Manifest:
        """The expired tag's kept answer, for an upstream that failed to revalidate it:
        counted by the reason and logged (once per upstream and reason a while)."""
        reason = next(name for kind, name in STALE_REASONS if isinstance(error, kind))
        self._metrics.stale_served.labels("tag").inc()
        self._metrics.stale_reasons.labels(reason).inc()
        if self._failures is not None:
            cause = f"tag {tag} served stale ({reason}): {error.message}"
            self._failures.warn(upstream.name, repo, error, cause)
        answer = await self._answer(upstream, repo, record, head=head)
        return answer.lasting(0, stale=True)

    def _standing(self, upstream: Upstream, repo: str, tag: str, head: bool) -> Manifest | None:
        """The answer `_by_tag` gave from the tag's record, while that record is still the
        one held here and fresh; what it counted and noted, counted and noted again."""
        record = self._tags.get((upstream.name, repo, tag))
        if record is None:
            return None
        kept = self._answers.get((upstream.name, repo, tag, head))
        ttl = self.ttl_of(upstream)
        left = ttl - (time.time() - record.checked_at)
        if kept is None or kept[0] is not record or left <= 0:
            return None
        counts = self._metrics.turn_counts
        counts.inc(self._tag_hit)
        self._holdings.note(upstream.name, repo, record.digest)
        if not head:
            counts.inc(self._manifest_hit)
        return kept[1].lasting(left)

    def _standing_digest(
        self, upstream: Upstream, repo: str, digest: str, head: bool
    ) -> Manifest | None:
        """`_by_digest` where it needs nothing but memory: the bytes held here, and the
        repository known here to hold them (every pull asks by digest after its tag)."""
        cached = self._hot.get(digest)
        if cached is None or not self._holdings.known_here(upstream.name, repo, digest):
            return None
        self._metrics.turn_counts.inc(self._manifest_hit)
        media_type, stored = cached
        return Manifest(digest, media_type, len(stored), None if head else stored)

    async def _shared_tag(
        self, upstream: str, repo: str, tag: str, after: float | None
    ) -> TagRecord | None:
        """The shared store's record if another replica wrote one since the record checked
        at `after` (compared for a change, not an order: replicas' clocks may differ)."""
        if not self._shared.enabled:
            return None
        record = await self._metadata.get_tag(upstream, repo, tag)
        if record is None or (after is not None and record.checked_at == after):
            return None
        self._tags.put((upstream, repo, tag), record)
        return record

    async def _resolved_elsewhere(
        self, upstream: Upstream, repo: str, tag: str, *, head: bool
    ) -> Manifest | None:
        """An unknown tag another replica resolved meanwhile, answered from its record."""
        record = await self._shared_tag(upstream.name, repo, tag, None)
        return None if record is None else await self._answer(upstream, repo, record, head=head)

    async def _fetch_tag(self, upstream: Upstream, repo: str, tag: str, *, head: bool) -> Manifest:
        """Resolve an unknown tag upstream with a HEAD, which costs no pull (Docker Hub
        counts manifest GETs): a GET is answered from the cache when the digest's bytes
        are there (another tag's, another repository's), else the tag is fetched with the
        one GET the client's GET would have cost. Clients that GET a tag outright (podman,
        CRI-O, skopeo) spent a pull on each new tag name, and got the upstream's 429 past
        the limit, for bytes held here."""
        info, body = await self._ask(upstream, repo, tag, head=True)
        cached = None
        if body is None and not head:
            cached = await self._read_cached(info.digest)
            if cached is None:
                # The tag itself, not the digest the HEAD named: what it names by now,
                # checked against its own digest, as a GET of it always was.
                info, body = await upstream.manifest(repo, tag, ALL_TYPES, head=False)
        record = TagRecord(info.digest, info.media_type, info.size, time.time())
        if body is not None:  # fetched (or the HEAD said too little: `_ask` asked a GET)
            await self._store(upstream, repo, info, body)
            answer = Manifest(info.digest, info.media_type, info.size, None if head else body)
        else:
            # Held here: what it names is the repository's too, as a fetch records it
            # (its blobs then need no upstream HEAD to be served under it).
            named = [] if cached is None else references(cached[1], cached[0])
            await self._holdings.record(upstream.name, repo, [info.digest, *named])
            if cached is not None:
                await self._metadata.add_repository(upstream.catalog_name(repo))
            answer = await self._answer(upstream, repo, record, head=head)
        await self._put_tag(upstream.name, repo, tag, record)
        return answer

    async def _ask(
        self, upstream: Upstream, repo: str, tag: str, *, head: bool
    ) -> tuple[ManifestInfo, bytes | None]:
        """The tag upstream: its headers for a HEAD, enough for a tag record, else a GET. A
        HEAD without Docker-Content-Digest or a manifest media type says nothing cacheable;
        one without a length, only when the digest's bytes are cached here to tell it (a
        size of 0 would be the descriptor size containerd fetches with next)."""
        info, body = await upstream.manifest(repo, tag, ALL_TYPES, head=head)
        if body is None and _complete(info) and not info.size:
            info = await self._sized(info)
        if body is None and not (_complete(info) and info.size):
            info, body = await upstream.manifest(repo, tag, ALL_TYPES, head=False)
        return info, body

    async def _sized(self, info: ManifestInfo) -> ManifestInfo:
        """A HEAD's answer with the length of the digest's bytes when they are cached."""
        cached = await self._read_cached(info.digest)
        if cached is None:
            return info
        return ManifestInfo(info.digest, info.media_type, len(cached[1]))

    async def _revalidate(
        self, upstream: Upstream, repo: str, tag: str, record: TagRecord
    ) -> TagRecord:
        """HEAD the tag upstream; a fresh record, with a new digest when it moved."""
        try:
            info, body = await self._ask(upstream, repo, tag, head=True)
        except STALE_ON:
            self._metrics.revalidations.labels("error").inc()
            raise
        if body is not None:
            await self._store(upstream, repo, info, body)
        changed = info.digest != record.digest
        await self._record_again(upstream, repo, info.digest)
        self._metrics.revalidations.labels("changed" if changed else "unchanged").inc()
        fresh = TagRecord(info.digest, info.media_type or record.media_type, info.size, time.time())
        await self._put_tag(upstream.name, repo, tag, fresh)
        return fresh

    async def _record_again(self, upstream: Upstream, repo: str, digest: str) -> None:
        """A revalidated tag's manifest and what it names, recorded anew: what a pulled
        tag holds outlives the retention of holdings, as its record does."""
        cached = await self._read_cached(digest)
        named = [] if cached is None else references(cached[1], cached[0])
        await self._holdings.record(upstream.name, repo, [digest, *named])
        await self._holdings.record_sent_again(upstream.name, [digest, *named])

    async def _answer(
        self, upstream: Upstream, repo: str, record: TagRecord, *, head: bool
    ) -> Manifest:
        """Answer from a tag record: HEAD from the record alone, GET from the stored bytes."""
        # The client asks for this digest next, by digest: the tag vouches for it.
        self._holdings.note(upstream.name, repo, record.digest)
        if head and record.size:  # 0: a record of an older release, from a HEAD without one
            return Manifest(record.digest, record.media_type, record.size, None)
        return await self._by_digest(upstream, repo, record.digest, head=head)

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

    async def _store(
        self, upstream: Upstream, repo: str, info: ManifestInfo, body: bytes, catalog: bool = True
    ) -> None:
        self._hot.put(info.digest, (info.media_type, body))
        try:
            written = await self._storage.write_manifest(
                parse_digest(info.digest), info.media_type, body
            )
        except OSError as exc:  # a full or read-only disk: answer from memory anyway
            self._storage.mark_unwritable(exc)
            written = False
        if written and self.on_stored is not None:
            self.on_stored(len(body))
        if catalog:  # content of the repository, not a document the mirror composed
            await self._holdings.record_sent(upstream.name, [info.digest])
            named = references(body, info.media_type)
            await self._holdings.record(upstream.name, repo, [info.digest, *named])
            await self._metadata.add_repository(upstream.catalog_name(repo))


def _complete(info: ManifestInfo) -> bool:
    """Whether a HEAD's answer is enough for a tag record: a sha256 digest (the cache's
    key; Upstream.manifest let through only a well-formed one) and a manifest media type."""
    return info.digest.startswith("sha256:") and bool(info.media_type)


def tag_lease(upstream: str, repo: str, tag: str) -> str:
    """The lease on revalidating or resolving a tag (one replica at a time)."""
    return f"tag:{upstream}/{repo}:{tag}"
