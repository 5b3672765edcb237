"""Which digests each repository holds: cached content is served only where it belongs.

Blobs and manifests are stored by digest alone, shared by every repository. A digest is
served under a repository only when the mirror knows that repository holds it: it came
through the repository's own manifests (the manifest itself; an image manifest's config
and layers, which its registry checked at push), a tag record of the repository points at
it, or the upstream confirmed it with a HEAD under that repository's own credentials.
Anything else gets the upstream's own not-found answer, so knowing a digest pulled through
a private repository does not open it under a public one, or under a repository that does
not exist. What a registry takes unchecked proves nothing: a layer with `urls` or of a
foreign or non-distributable type, and an index's children (fetched or confirmed under
the repository, like any manifest asked for by digest).

The cache is by digest across upstreams too: under an upstream, cached bytes are served
only once that upstream sent them itself (a download or manifest fetch from it, checked
against the digest; recorded under `SENT`). A manifest, tag or HEAD of one upstream naming
a digest another one sent gets the bytes fetched from it under the repository and checked
first. With one upstream configured nothing else can have sent them, and nothing is asked.

What is known is kept in the metadata store (shared by replicas, kept as long as tag
records) and in a bounded in-process LRU, so a warm pull asks the store once per
(repository, digest) and this process, and memory after that. A refusal is remembered
briefly, so a flood of guesses is not a flood of upstream HEADs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mirror.metadata.store import MetadataStore
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    BlobUnknown,
    DigestMismatch,
    ManifestUnknown,
    RegistryError,
    UpstreamUnavailable,
)
from mirror.oci.negotiation import DOCKER_MANIFEST, MANIFEST_TYPES, OCI_MANIFEST
from mirror.oci.reference import as_digest, compute_digest, parse_digest
from mirror.upstream.body import BODY_ERRORS
from mirror.upstream.client import Upstream
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

KNOWN_ENTRIES = 65536
REFUSED_ENTRIES = 10000
# How long the upstream's "not in this repository" is believed without asking again.
REFUSED_FOR = 30.0
BLOB, MANIFEST = "blob", "manifest"
_NOT_FOUND: dict[str, type[RegistryError]] = {BLOB: BlobUnknown, MANIFEST: ManifestUnknown}

Key = tuple[str, str, str]  # (upstream, repository, digest)
# "This upstream sent these bytes", kept as the holdings of a repository of this name: no
# repository can have it (a name starts with a lowercase letter or a digit), and so the
# record gets the holdings' retention, replication and every metadata backend (Redis,
# SQLite, in-process with its snapshot) with no new store method on each.
SENT = "_sent"
# The manifests whose config and layers count as held by their repository (references).
IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Layer types a registry accepts without the blob (Windows base layers and the like:
# `application/vnd.docker.image.rootfs.foreign.diff.tar.gzip`,
# `application/vnd.oci.image.layer.nondistributable.v1.tar+gzip`).
UNSEEN_LAYER_MARKERS = ("foreign", "nondistributable")


def references(body: bytes, media_type: str) -> list[str]:
    """The blobs an image manifest names that its registry checked at push: its config and
    its layers. Nothing of an index (a registry may take an index without its children:
    they are confirmed one by one), and no descriptor a registry takes unseen: one with
    `urls`, or of a foreign or non-distributable layer type (anyone may name any digest so)."""
    if media_type not in IMAGE_MANIFESTS:
        return []
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return []
    # The body's own type must agree: a registry checks only the fields of the type it was
    # pushed as, so `layers` in a document that is (or claims to be) an index were never looked at.
    if not isinstance(doc, dict) or doc.get("mediaType", media_type) not in IMAGE_MANIFESTS:
        return []
    if "manifests" in doc:
        return []
    found: list[Any] = [doc.get("config")]
    layers = doc.get("layers")
    if isinstance(layers, list):
        found.extend(layers)
    return [entry["digest"] for entry in found if _checked_at_push(entry)]


def _checked_at_push(entry: object) -> bool:
    """Whether a descriptor names a blob its registry must have had to take the manifest."""
    if not isinstance(entry, dict) or "digest" not in entry or "urls" in entry:
        return False
    media_type = entry.get("mediaType")
    return not isinstance(media_type, str) or not any(
        marker in media_type for marker in UNSEEN_LAYER_MARKERS
    )


def _valid(digests: Iterable[object]) -> list[str]:
    """Only well-formed digests are recorded: a manifest's JSON is the upstream's to write."""
    return sorted({d for d in digests if isinstance(d, str) and as_digest(d) is not None})


class Holdings:
    """What the mirror knows each repository holds, and the upstream's word on the rest."""

    def __init__(
        self,
        metadata: MetadataStore,
        metrics: Metrics,
        refused_for: float = REFUSED_FOR,
        *,
        one_upstream: bool = False,
    ) -> None:
        self._metadata = metadata
        self._metrics = metrics
        self._refused_for = refused_for
        # With one upstream configured, every byte in the cache came from it: what it sent
        # need not be asked (a cache from before these records serves on as it did).
        self._one_upstream = one_upstream
        # Held and sent: what may be served under (upstream, repository) from the cache.
        self._known: LRU[Key, bool] = LRU(KNOWN_ENTRIES)
        # (upstream, digest): the upstream sent these bytes itself.
        self._sent: LRU[tuple[str, str], bool] = LRU(KNOWN_ENTRIES)
        # (upstream, repository, digest) → (until when, the upstream's not-found message).
        self._refused: LRU[Key, tuple[float, str]] = LRU(REFUSED_ENTRIES)
        # A burst of requests for one unknown digest under one repository: one HEAD.
        self._flight = SingleFlight()
        # How a blob's HEAD is asked: directly, or (set by create_app) through the blob-size
        # lookups that replicas share, so one HEAD answers every replica.
        self.head_blob: Callable[[Upstream, str, str], Awaitable[object]] = _head_blob

    async def close(self) -> None:
        await self._flight.close()

    def note(self, upstream: str, repo: str, digest: str) -> None:
        """Known to this process only: what a tag record of the repository already says
        (of bytes this process knows the upstream sent)."""
        key = (upstream, repo, digest)
        if self._sent_here(upstream, digest) and self._known.get(key) is None:
            self._known.put(key, True)  # a look-up keeps it recent, for less than a put

    async def record(self, upstream: str, repo: str, digests: Iterable[object]) -> None:
        """The repository holds these (they came through it): for every replica."""
        valid = _valid(digests)
        if not valid:
            return
        for digest in valid:
            if self._sent_here(upstream, digest):
                self._known.put((upstream, repo, digest), True)
        await self._metadata.add_holdings(upstream, repo, valid, time.time())

    async def record_sent(self, upstream: str, digests: Iterable[object]) -> None:
        """The upstream sent these bytes itself, and they matched their digests."""
        valid = _valid(digests)
        if not valid:
            return
        for digest in valid:
            self._sent.put((upstream, digest), True)
        await self._metadata.add_holdings(upstream, SENT, valid, time.time())

    async def record_sent_again(self, upstream: str, digests: Iterable[object]) -> None:
        """Of these, what the upstream sent is recorded anew: bytes a pulled tag names
        outlive the retention of holdings, as its record does."""
        if self._one_upstream:  # nothing asks; nor may a guess be recorded as sent
            return
        sent = [d for d in _valid(digests) if await self.sent(upstream, d)]
        if sent:
            await self._metadata.add_holdings(upstream, SENT, sent, time.time())

    def _sent_here(self, upstream: str, digest: str) -> bool:
        return self._one_upstream or self._sent.get((upstream, digest)) is not None

    async def sent(self, upstream: str, digest: str) -> bool:
        """Whether the upstream itself sent these bytes (memory, then the store)."""
        if self._sent_here(upstream, digest):
            return True
        if not await self._metadata.holds(upstream, SENT, digest):
            return False
        self._sent.put((upstream, digest), True)
        return True

    def known_here(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether this process already knows the repository holds the digest (memory)."""
        return self._known.get((upstream, repo, digest)) is not None

    async def known(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether the repository is known to hold the digest, and its upstream to have
        sent those bytes (memory, then the store)."""
        key = (upstream, repo, digest)
        if self._known.get(key):
            return True
        if not await self._metadata.holds(upstream, repo, digest):
            return False
        if not await self.sent(upstream, digest):
            return False
        self._known.put(key, True)
        return True

    async def confirm(
        self, upstream: Upstream, repo: str, digest: str, kind: str, *, fetching: bool = False
    ) -> None:
        """For a digest not `known` under the repository: return when the upstream says
        the repository holds it (asked under its own credentials, remembered), else
        raise the upstream's not-found, as a miss would. Bytes the upstream never sent
        are fetched from it under the repository and checked against the digest first,
        unless `fetching`: the bytes are not here, but on their way (the caller's download
        from this upstream, or another replica's or worker's)."""
        key = (upstream.name, repo, digest)
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() < refused[0]:
            self._metrics.holdings_checks.labels(kind, "refused").inc()
            # A remembered upstream 404 like the upstream client's own (what a digest never
            # pulled meets when asked again), counted as one: the holdings series is not on
            # a client listener's /metrics, and the two must look alike there.
            self._metrics.negative_hits.inc()
            raise _NOT_FOUND[kind](refused[1])
        await self._flight.do(
            (kind, fetching, *key), lambda: self._ask(upstream, repo, digest, kind, fetching)
        )

    async def _ask(
        self, upstream: Upstream, repo: str, digest: str, kind: str, fetching: bool
    ) -> None:
        """One request under the repository: a HEAD, or the bytes it never sent; what it
        says is remembered."""
        try:
            if fetching or await self.sent(upstream.name, digest):
                if not await self._metadata.holds(upstream.name, repo, digest):
                    await self._head(upstream, repo, digest, kind)
            else:
                await self._fetch(upstream, repo, digest, kind)
                await self.record_sent(upstream.name, [digest])
        except (BlobUnknown, ManifestUnknown) as exc:
            until = time.monotonic() + self._refused_for
            self._refused.put((upstream.name, repo, digest), (until, exc.message))
            self._metrics.holdings_checks.labels(kind, "refused").inc()
            raise
        self._metrics.holdings_checks.labels(kind, "confirmed").inc()
        await self.record(upstream.name, repo, [digest])

    async def _head(self, upstream: Upstream, repo: str, digest: str, kind: str) -> None:
        if kind == BLOB:
            await self.head_blob(upstream, repo, digest)
        else:
            await upstream.manifest(repo, digest, sorted(MANIFEST_TYPES), head=True)

    async def _fetch(self, upstream: Upstream, repo: str, digest: str, kind: str) -> None:
        """The bytes from the upstream under the repository, hashed and let go: the cache
        has them already, from elsewhere."""
        expected = parse_digest(digest)
        if kind == MANIFEST:
            _, body = await upstream.manifest(repo, digest, sorted(MANIFEST_TYPES), head=False)
            if body is None or compute_digest(body, expected.algorithm) != expected:
                self._metrics.digest_mismatches.labels(kind).inc()
                raise DigestMismatch(f"upstream {upstream.name} sent another manifest for {digest}")
            return
        hasher = expected.hasher()
        source = await upstream.open_blob(repo, digest)
        async with source:
            try:
                async for chunk in source.chunks():
                    hasher.update(chunk)
            except BODY_ERRORS as exc:
                raise UpstreamUnavailable(
                    f"upstream {upstream.name} broke off blob {digest}: {type(exc).__name__}"
                ) from None
        if source.offset != 0 or hasher.hexdigest() != expected.hex:
            self._metrics.digest_mismatches.labels(kind).inc()
            raise DigestMismatch(f"upstream {upstream.name} sent other bytes for blob {digest}")


async def _head_blob(upstream: Upstream, repo: str, digest: str) -> object:
    return await upstream.blob_size(repo, digest)
