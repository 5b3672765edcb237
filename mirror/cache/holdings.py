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
from mirror.oci.errors import BlobUnknown, ManifestUnknown, RegistryError
from mirror.oci.negotiation import DOCKER_MANIFEST, MANIFEST_TYPES, OCI_MANIFEST
from mirror.oci.reference import as_digest
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
    except ValueError:
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
        self, metadata: MetadataStore, metrics: Metrics, refused_for: float = REFUSED_FOR
    ) -> None:
        self._metadata = metadata
        self._metrics = metrics
        self._refused_for = refused_for
        self._known: LRU[Key, bool] = LRU(KNOWN_ENTRIES)
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
        """Known to this process only: what a tag record of the repository already says."""
        key = (upstream, repo, digest)
        if self._known.get(key) is None:  # a look-up keeps it recent, for less than a put
            self._known.put(key, True)

    async def record(self, upstream: str, repo: str, digests: Iterable[object]) -> None:
        """The repository holds these (they came through it): for every replica."""
        valid = _valid(digests)
        if not valid:
            return
        for digest in valid:
            self._known.put((upstream, repo, digest), True)
        await self._metadata.add_holdings(upstream, repo, valid, time.time())

    def known_here(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether this process already knows the repository holds the digest (memory)."""
        return self._known.get((upstream, repo, digest)) is not None

    async def known(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether the repository is known to hold the digest (memory, then the store)."""
        key = (upstream, repo, digest)
        if self._known.get(key):
            return True
        if not await self._metadata.holds(upstream, repo, digest):
            return False
        self._known.put(key, True)
        return True

    async def confirm(self, upstream: Upstream, repo: str, digest: str, kind: str) -> None:
        """For a digest not `known` under the repository: return when the upstream says
        the repository holds it (asked under its own credentials, remembered), else
        raise the upstream's not-found, as a miss would."""
        key = (upstream.name, repo, digest)
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() < refused[0]:
            self._metrics.holdings_checks.labels(kind, "refused").inc()
            raise _NOT_FOUND[kind](refused[1])
        await self._flight.do((kind, *key), lambda: self._ask(upstream, repo, digest, kind))

    async def _ask(self, upstream: Upstream, repo: str, digest: str, kind: str) -> None:
        """One HEAD under the repository: what it says is remembered."""
        try:
            if kind == BLOB:
                await self.head_blob(upstream, repo, digest)
            else:
                await upstream.manifest(repo, digest, sorted(MANIFEST_TYPES), head=True)
        except (BlobUnknown, ManifestUnknown) as exc:
            until = time.monotonic() + self._refused_for
            self._refused.put((upstream.name, repo, digest), (until, exc.message))
            self._metrics.holdings_checks.labels(kind, "refused").inc()
            raise
        self._metrics.holdings_checks.labels(kind, "confirmed").inc()
        await self.record(upstream.name, repo, [digest])


async def _head_blob(upstream: Upstream, repo: str, digest: str) -> object:
    return await upstream.blob_size(repo, digest)
