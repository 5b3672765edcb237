"""Referrers (OCI distribution 1.1): the signatures, SBOMs and attestations of a manifest.

Every upstream gets the API through the mirror, whether or not it has one:

- an upstream with the referrers API: its index (asked for unfiltered, so one cached
  answer serves every `artifactType`);
- an upstream without it (Docker Hub, distribution 2.8, Nexus): the index that signing
  tools keep under the tag `<alg>-<hex>` of the subject (the spec's referrers tag schema),
  fetched like any tag;
- neither: an empty index. The spec forbids a 404 from a registry with the API, and a
  client told 404 goes guessing.

The answer is kept like a tag (`ManifestService.remember`, under a key no real tag can
take): fresh for the tag TTL, then asked again (by one request at a time; replicas: by one
of them, under the lease `referrers:<upstream>/<repo>@<subject>`, the others read what it
kept), and served stale while the upstream fails, so verifying a signature keeps working
through an outage. `artifactType` is always filtered here, so the answer says so
(`OCI-Filters-Applied`) whatever the upstream did.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from mirror.cache.manifests import LOOKUP_FAILED, ManifestService
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.oci.negotiation import OCI_INDEX
from mirror.oci.reference import Digest
from mirror.upstream.client import Upstream
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
# Statuses with which a registry may say it has no such endpoint (no referrers API).
NO_API = frozenset({400, 404, 405, 501})
# Those that can only be about the endpoint: the upstream has no API, for any repository
# (a 404 counts when it carries no OCI error, which would be about a repository or subject).
NO_ENDPOINT = frozenset({405, 501})
# An upstream (or a repository of one) that showed it has no API is not asked again for
# this long; that many repositories are remembered, the least recently asked forgotten.
NO_API_MEMORY = 3600.0
NO_API_REPOSITORIES = 10_000
MAX_INDEX_BYTES = 4 * 1024 * 1024
# A tag list read only to learn the repository exists (upstreams may ignore `n`).
MAX_TAGS_PROBE_BYTES = 16 * 1024 * 1024
# An upstream that pages its referrers: pages followed and merged into one index.
MAX_PAGES = 20


@dataclass(frozen=True, slots=True)
class Referrers:
    """An OCI image index of the manifests that refer to a subject."""

    body: bytes
    filtered: bool  # artifactType applied
    fresh_for: float
    stale: bool = False


def referrers_key(subject: Digest) -> str:
    """Where the answer is kept: `+` is in no tag, so no real tag can collide."""
    return f"referrers+{subject.algorithm}-{subject.hex}"


def schema_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for a subject: `sha256-<hex>`."""
    return f"{subject.algorithm}-{subject.hex}"


def filter_index(body: bytes, artifact_type: str) -> bytes:
    """The index with only the descriptors of `artifact_type`."""
    index = _parse_index(body)
    index["manifests"] = [
        entry
        for entry in index["manifests"]
        if isinstance(entry, dict) and entry.get("artifactType") == artifact_type
    ]
    return json.dumps(index).encode()


def _parse_index(body: bytes) -> dict[str, Any]:
    try:
        index = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        index = None
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ManifestInvalid("the upstream's referrers answer is not an image index")
    return index


class _NoApi(Exception):
    """The upstream answered without a referrers index: for every repository (`whole`),
    or perhaps for this one only."""

    def __init__(self, whole: bool) -> None:
        super().__init__()
        self.whole = whole


class ReferrersService:
    """Answers `GET /v2/<name>/referrers/<digest>` for any upstream."""

    def __init__(self, manifests: ManifestService, metrics: Metrics) -> None:
        self._manifests = manifests
        self._metrics = metrics
        # When an upstream's API is asked again (monotonic): by name, and by (name,
        # repository) after an answer that may have been about the repository alone.
        self._no_api_until: dict[str, float] = {}
        self._no_api_here: LRU[tuple[str, str], float] = LRU(NO_API_REPOSITORIES)
        self._flight = SingleFlight()

    async def close(self) -> None:
        await self._flight.close()

    async def get(
        self, upstream: Upstream, repo: str, subject: Digest, artifact_type: str | None
    ) -> Referrers:
        found = await self._index(upstream, repo, subject)
        if artifact_type:
            return Referrers(
                filter_index(found.body, artifact_type), True, found.fresh_for, found.stale
            )
        return found

    async def _index(self, upstream: Upstream, repo: str, subject: Digest) -> Referrers:
        """The unfiltered index: kept while fresh, else asked for, else kept but stale."""
        key = referrers_key(subject)
        ttl = self._manifests.ttl_of(upstream)
        kept = await self._manifests.recall(upstream, repo, key)
        if kept is not None and kept[0].is_fresh(ttl):
            fresh_for = ttl - (time.time() - kept[0].checked_at)
            return Referrers(kept[1], False, fresh_for)
        seen = None if kept is None else kept[0].checked_at
        try:
            # Concurrent requests make one upstream sequence; replicas, one among them all.
            return await self._flight.do(
                (upstream.name, repo, str(subject)),
                lambda: self._manifests.shared.once(
                    "referrers",
                    f"referrers:{upstream.name}/{repo}@{subject}",
                    lambda: self._kept_elsewhere(upstream, repo, key, seen),
                    lambda: self._fetch(upstream, repo, subject),
                    LOOKUP_FAILED,
                ),
            )
        except (UpstreamUnavailable, TooManyRequests):
            if kept is None or not kept[0].is_fresh(ttl + self._manifests.stale_if_error):
                raise
            self._metrics.stale_served.labels("referrers").inc()
            return Referrers(kept[1], False, 0, stale=True)

    async def _kept_elsewhere(
        self, upstream: Upstream, repo: str, key: str, seen: float | None
    ) -> Referrers | None:
        """The index another replica kept since the one checked at `seen` (compared for a
        change, not an order: replicas' clocks may differ)."""
        kept = await self._manifests.recall(upstream, repo, key)
        if kept is None or kept[0].checked_at == seen:
            return None
        ttl = self._manifests.ttl_of(upstream)
        fresh_for = min(max(ttl - (time.time() - kept[0].checked_at), 0.0), ttl)
        return Referrers(kept[1], False, fresh_for)

    async def _fetch(self, upstream: Upstream, repo: str, subject: Digest) -> Referrers:
        """Ask the upstream, and keep a fresh answer."""
        body, stale = await self._resolve(upstream, repo, subject)
        if stale:  # the tag-schema index, itself served stale: not a fresh answer
            return Referrers(body, False, 0, stale=True)
        await self._manifests.remember(upstream, repo, referrers_key(subject), OCI_INDEX, body)
        return Referrers(body, False, self._manifests.ttl_of(upstream))

    async def _resolve(self, upstream: Upstream, repo: str, subject: Digest) -> tuple[bytes, bool]:
        """Ask the upstream: its API first (unless it has shown it has none), then the
        tag schema, then nothing refers to the subject. True when served stale."""
        if self._has_api(upstream, repo):
            try:
                return await self._from_api(upstream, repo, subject), False
            except _NoApi as absent:
                until = time.monotonic() + NO_API_MEMORY
                if absent.whole:
                    self._no_api_until[upstream.name] = until
                else:
                    self._no_api_here.put((upstream.name, repo), until)
        tag = schema_tag(subject)
        try:
            # A HEAD first: Docker Hub counts a GET against the pull limit, even one that
            # finds nothing, and most subjects have no referrers.
            await self._manifests.get(upstream, repo, tag, (OCI_INDEX,), head=True)
        except ManifestUnknown:
            await self._check_repository(upstream, repo)
            return EMPTY_INDEX, False
        found = await self._manifests.get(upstream, repo, tag, (OCI_INDEX,), head=False)
        body = found.body or b""
        _parse_index(body)
        return body, found.stale

    def _has_api(self, upstream: Upstream, repo: str) -> bool:
        """Whether the upstream's API is worth asking for this repository now."""
        now = time.monotonic()
        if self._no_api_until.get(upstream.name, 0.0) > now:
            return False
        return (self._no_api_here.get((upstream.name, repo)) or 0.0) <= now

    async def _from_api(self, upstream: Upstream, repo: str, subject: Digest) -> bytes:
        """The upstream's referrers index (its pages merged), or _NoApi."""
        first, link = await self._api_page(upstream, repo, f"/v2/{repo}/referrers/{subject}")
        if link is None:
            return first
        index = _parse_index(first)
        for _ in range(MAX_PAGES - 1):
            try:
                page, link = await self._api_page(upstream, repo, link)
            except _NoApi:
                raise ManifestInvalid(
                    f"the next page of the referrers of {subject} is gone"
                ) from None
            index["manifests"].extend(_parse_index(page)["manifests"])
            if link is None:
                return json.dumps(index).encode()
        raise ManifestInvalid(f"the referrers of {subject} run past {MAX_PAGES} pages")

    async def _api_page(self, upstream: Upstream, repo: str, path: str) -> tuple[bytes, str | None]:
        """One page of the referrers API and the path of the next; _NoApi when the
        upstream answers without one."""
        page = await upstream.document(
            path, repo, "referrers", accept=OCI_INDEX, limit=MAX_INDEX_BYTES, passed=NO_API
        )
        if page.absent:
            if page.error_code == "NAME_UNKNOWN":
                raise NameUnknown(f"repository {repo} not known upstream")
            whole = page.status in NO_ENDPOINT or (page.status == 404 and page.error_code is None)
            raise _NoApi(whole)
        body = page.body
        link = _next_path(page.link, upstream.url)
        _parse_index(body)
        return body, link

    async def _check_repository(self, upstream: Upstream, repo: str) -> None:
        """NameUnknown when the upstream does not know the repository (its tag list says)."""
        answer = await upstream.document(
            f"/v2/{repo}/tags/list?n=1", repo, "tags", accept="application/json",
            limit=MAX_TAGS_PROBE_BYTES, passed=frozenset({404}),
        )  # fmt: skip
        if answer.absent and answer.error_code == "NAME_UNKNOWN":
            raise NameUnknown(f"repository {repo} not known upstream")


def _next_path(link: str | None, base: str) -> str | None:
    """The path (and query) of a `Link: <...>; rel="next"`, below the upstream's URL;
    None for the last page, or a link to another host (its token is not for it);
    ManifestInvalid for a link that is no URL."""
    if not link or 'rel="next"' not in link:
        return None
    home = urlsplit(base)
    try:
        target = urlsplit(urljoin(base + "/", link.partition(">")[0].strip(" <")))
    except ValueError:  # no URL (`http://[::1/`): where the rest is cannot be known
        raise ManifestInvalid("the upstream's next page of referrers is no URL") from None
    if (target.scheme, target.netloc) != (home.scheme, home.netloc):
        return None
    path = target.path.removeprefix(home.path)
    return path + (f"?{target.query}" if target.query else "")
