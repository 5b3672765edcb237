"""Referrers (OCI distribution 1.1): the signatures, SBOMs and attestations of a manifest.

Every upstream gets the API through the mirror, whether or not it has one:

- an upstream with the referrers API: its index (asked for unfiltered, so one cached
  answer serves every `artifactType`);
- an upstream without it (Docker Hub, distribution 2.8, Nexus): the index that signing
  tools keep under the tag `<alg>-<hex>` of the subject (the spec's referrers tag schema),
  fetched like any tag;
- neither: an empty index. The spec forbids a 404 from a registry with the API, and a
  client told 404 goes guessing.

An upstream whose API has shown it is missing is not asked for an hour: for every
repository after an answer about the endpoint (405, 501, a 404 with no OCI error), for
one repository after other 400s and 404s. A MANIFEST_UNKNOWN is about the subject alone
(Quay answers 400 MANIFEST_UNKNOWN for a subject it does not know, where the spec asks
for an empty index): that subject gets the tag schema (the spec's answer to a 404, and
an empty index when no such tag is there), and the API is still asked for the others.

The answer is kept like a tag (`ManifestService.remember`, under a key no real tag can
take): fresh for the tag TTL, then asked again (by one request at a time; replicas: by one
of them, under the lease `referrers:<upstream>/<repo>@<subject>`, the others read what it
kept), and served stale while the upstream fails, so verifying a signature keeps working
through an outage. `artifactType` is always filtered here, so the answer says so
(`OCI-Filters-Applied`) whatever the upstream did.

What an upstream can make the mirror hold is bounded: at most MAX_PAGES pages, and
MAX_INDEX_BYTES (the manifest size limit) for the whole index, every page together and
as merged. Past either bound the answer is refused (502 MANIFEST_INVALID), as an index
cut short would look whole; an entry that is no descriptor (a valid `mediaType`,
`digest` and `size`) is left out. Each index is parsed in a thread, once: filtering
works on its split form, kept by digest.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Literal
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
from mirror.oci.negotiation import MAX_MANIFEST_BYTES, OCI_INDEX
from mirror.oci.reference import Digest, as_digest, compute_digest
from mirror.upstream.client import Document, Upstream
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
# Statuses with which a registry may say it has no such endpoint (no referrers API).
NO_API = frozenset({400, 404, 405, 501})
# Those that can only be about the endpoint: the upstream has no API, for any repository
# (a 404 counts when it carries no OCI error, which would be about a repository or subject).
NO_ENDPOINT = frozenset({405, 501})
# The OCI error of an answer about the subject alone (the upstream does not know it).
SUBJECT_UNKNOWN = "MANIFEST_UNKNOWN"
# An upstream (or a repository of one) that showed it has no API is not asked again for
# this long; that many repositories are remembered, the least recently asked forgotten.
NO_API_MEMORY = 3600.0
NO_API_REPOSITORIES = 10_000
# The whole index, its pages together: it is kept and served as one manifest.
MAX_INDEX_BYTES = MAX_MANIFEST_BYTES
# A tag list read only to learn the repository exists (upstreams may ignore `n`).
MAX_TAGS_PROBE_BYTES = 16 * 1024 * 1024
# An upstream that pages its referrers: pages followed and merged into one index.
MAX_PAGES = 20
# Indexes kept split for filtering (bytes, about twice each index's size).
PARSED_INDEX_BYTES = 32 * 1024 * 1024
# A descriptor's `mediaType` (RFC 6838, as the OCI image spec gives it).
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_COMPACT = (",", ":")


@dataclass(frozen=True, slots=True)
class Referrers:
    """An OCI image index of the manifests that refer to a subject."""

    body: bytes
    filtered: bool  # artifactType applied
    fresh_for: float
    digest: str  # of `body` unfiltered: the key of its split form
    stale: bool = False


@dataclass(frozen=True, slots=True)
class ParsedIndex:
    """An index as served, and split for filtering: the JSON before its descriptors, and
    each descriptor's `artifactType` with its JSON."""

    body: bytes
    digest: str
    head: bytes
    entries: tuple[tuple[object, bytes], ...]
    weight: int

    def filtered(self, artifact_type: str) -> bytes:
        """The index with only the descriptors of `artifact_type`."""
        kept = (entry for kind, entry in self.entries if kind == artifact_type)
        return self.head + b",".join(kept) + b"]}"


def referrers_key(subject: Digest) -> str:
    """Where the answer is kept: `+` is in no tag, so no real tag can collide."""
    return f"referrers+{subject.algorithm}-{subject.hex}"


def schema_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for a subject: `sha256-<hex>`."""
    return f"{subject.algorithm}-{subject.hex}"


def merge_pages(pages: list[bytes]) -> ParsedIndex:
    """One index of the descriptors of every page (with the first page's other fields);
    a lone page with nothing left out is kept as the upstream sent it. ManifestInvalid
    when a page is no index or the merged index is past MAX_INDEX_BYTES. Blocking: for a
    thread (megabytes of JSON)."""
    indexes = [_parse_index(page) for page in pages]
    entries = [entry for index in indexes for entry in index["manifests"] if _is_descriptor(entry)]
    fields = {key: value for key, value in indexes[0].items() if key != "manifests"}
    if len(pages) == 1 and len(entries) == len(indexes[0]["manifests"]):
        body = pages[0]
    else:
        body = json.dumps({**fields, "manifests": entries}, separators=_COMPACT).encode()
    if len(body) > MAX_INDEX_BYTES:
        raise ManifestInvalid(f"the upstream's referrers index is past {MAX_INDEX_BYTES} bytes")
    head = json.dumps({**fields, "manifests": []}, separators=_COMPACT).encode()[:-2]
    split = tuple(
        (entry.get("artifactType"), json.dumps(entry, separators=_COMPACT).encode())
        for entry in entries
    )
    weight = len(body) + len(head) + sum(len(entry) + 64 for _, entry in split)
    return ParsedIndex(body, str(compute_digest(body)), head, split, weight)


def _is_descriptor(entry: object) -> bool:
    """Whether an index entry is a descriptor: a media type, a digest and a size."""
    if not isinstance(entry, dict):
        return False
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    return (
        isinstance(media_type, str)
        and _MEDIA_TYPE.fullmatch(media_type) is not None
        and isinstance(digest, str)
        and as_digest(digest) is not None
        and type(size) is int
        and size >= 0
    )


def _parse_index(body: bytes) -> dict[str, Any]:
    try:
        index = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        index = None
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ManifestInvalid("the upstream's referrers answer is not an image index")
    return index


# What an answer without an index says has no referrers API.
Scope = Literal["upstream", "repository", "subject"]


class _NoApi(Exception):
    """The upstream answered without a referrers index: for every repository, perhaps for
    this one only, or for this subject only (`scope`)."""

    def __init__(self, scope: Scope) -> None:
        super().__init__()
        self.scope = scope


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
        self._parsed: LRU[str, ParsedIndex] = LRU(PARSED_INDEX_BYTES, lambda p: p.weight)

    async def close(self) -> None:
        await self._flight.close()

    async def get(
        self, upstream: Upstream, repo: str, subject: Digest, artifact_type: str | None
    ) -> Referrers:
        found = await self._index(upstream, repo, subject)
        if artifact_type:
            body = (await self._split(found)).filtered(artifact_type)
            return Referrers(body, True, found.fresh_for, found.digest, found.stale)
        return found

    async def _split(self, found: Referrers) -> ParsedIndex:
        """The index split for filtering: parsed in a thread once, then kept by digest."""
        parsed = self._parsed.get(found.digest)
        if parsed is None:
            parsed = await self._flight.do(
                ("parse", found.digest), lambda: self._parse([found.body])
            )
        return parsed

    async def _parse(self, pages: list[bytes]) -> ParsedIndex:
        """The pages merged into one index (in a thread), kept split for filtering."""
        parsed = await asyncio.to_thread(merge_pages, pages)
        self._parsed.put(parsed.digest, parsed)
        return parsed

    async def _index(self, upstream: Upstream, repo: str, subject: Digest) -> Referrers:
        """The unfiltered index: kept while fresh, else asked for, else kept but stale."""
        key = referrers_key(subject)
        ttl = self._manifests.ttl_of(upstream)
        kept = await self._manifests.recall(upstream, repo, key)
        if kept is not None and kept[0].is_fresh(ttl):
            fresh_for = ttl - (time.time() - kept[0].checked_at)
            return Referrers(kept[1], False, fresh_for, kept[0].digest)
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
            return Referrers(kept[1], False, 0, kept[0].digest, stale=True)

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
        return Referrers(kept[1], False, fresh_for, kept[0].digest)

    async def _fetch(self, upstream: Upstream, repo: str, subject: Digest) -> Referrers:
        """Ask the upstream, and keep a fresh answer."""
        index, stale = await self._resolve(upstream, repo, subject)
        if stale:  # the tag-schema index, itself served stale: not a fresh answer
            return Referrers(index.body, False, 0, index.digest, stale=True)
        key = referrers_key(subject)
        await self._manifests.remember(upstream, repo, key, OCI_INDEX, index.body, index.digest)
        return Referrers(index.body, False, self._manifests.ttl_of(upstream), index.digest)

    async def _resolve(
        self, upstream: Upstream, repo: str, subject: Digest
    ) -> tuple[ParsedIndex, bool]:
        """Ask the upstream: its API first (unless it has shown it has none), then the
        tag schema, then nothing refers to the subject. True when served stale."""
        if self._has_api(upstream, repo):
            try:
                return await self._from_api(upstream, repo, subject), False
            except _NoApi as absent:
                self._skip_api(upstream, repo, absent.scope)
        tag = schema_tag(subject)
        try:
            # A HEAD first: Docker Hub counts a GET against the pull limit, even one that
            # finds nothing, and most subjects have no referrers.
            await self._manifests.get(upstream, repo, tag, (OCI_INDEX,), head=True)
        except ManifestUnknown:
            await self._check_repository(upstream, repo)
            self._parsed.put(EMPTY.digest, EMPTY)  # for a filter asking for it by digest
            return EMPTY, False
        found = await self._manifests.get(upstream, repo, tag, (OCI_INDEX,), head=False)
        return await self._parse([found.body or b""]), found.stale

    def _has_api(self, upstream: Upstream, repo: str) -> bool:
        """Whether the upstream's API is worth asking for this repository now."""
        now = time.monotonic()
        if self._no_api_until.get(upstream.name, 0.0) > now:
            return False
        return (self._no_api_here.get((upstream.name, repo)) or 0.0) <= now

    def _skip_api(self, upstream: Upstream, repo: str, scope: Scope) -> None:
        """Leave the upstream's API unasked for NO_API_MEMORY: for every repository, or
        for this one; an answer about one subject leaves it asked for the others."""
        until = time.monotonic() + NO_API_MEMORY
        if scope == "upstream":
            self._no_api_until[upstream.name] = until
        elif scope == "repository":
            self._no_api_here.put((upstream.name, repo), until)

    async def _from_api(self, upstream: Upstream, repo: str, subject: Digest) -> ParsedIndex:
        """The upstream's referrers index (its pages merged), or _NoApi. The pages must
        come within the paging deadline: past it the upstream failed (a kept index served
        stale)."""
        async with upstream.within_paging_deadline(f"the referrers of {subject} in {repo}"):
            pages = await self._api_pages(upstream, repo, subject)
        return await self._parse(pages)

    async def _api_pages(self, upstream: Upstream, repo: str, subject: Digest) -> list[bytes]:
        """Every page of the referrers API, at most MAX_INDEX_BYTES together; _NoApi."""
        path: str | None = f"/v2/{repo}/referrers/{subject}"
        pages: list[bytes] = []
        while path is not None:
            if len(pages) == MAX_PAGES:
                raise ManifestInvalid(f"the referrers of {subject} run past {MAX_PAGES} pages")
            budget = MAX_INDEX_BYTES - sum(map(len, pages))
            try:
                page, path = await self._api_page(upstream, repo, path, budget)
            except _NoApi:
                if not pages:
                    raise
                raise ManifestInvalid(
                    f"the next page of the referrers of {subject} is gone"
                ) from None
            pages.append(page)
        return pages

    async def _api_page(
        self, upstream: Upstream, repo: str, path: str, limit: int
    ) -> tuple[bytes, str | None]:
        """One page of the referrers API (at most `limit` bytes) and the path of the next;
        _NoApi when the upstream answers without one."""
        page = await upstream.document(
            path, repo, "referrers", accept=OCI_INDEX, limit=limit, passed=NO_API
        )
        if page.absent:
            if page.error_code == "NAME_UNKNOWN":
                raise NameUnknown(f"repository {repo} not known upstream")
            raise _NoApi(_no_api_scope(page))
        return page.body, _next_path(page.link, upstream.url)

    async def _check_repository(self, upstream: Upstream, repo: str) -> None:
        """NameUnknown when the upstream does not know the repository (its tag list says)."""
        answer = await upstream.document(
            f"/v2/{repo}/tags/list?n=1", repo, "tags", accept="application/json",
            limit=MAX_TAGS_PROBE_BYTES, passed=frozenset({404}),
        )  # fmt: skip
        if answer.absent and answer.error_code == "NAME_UNKNOWN":
            raise NameUnknown(f"repository {repo} not known upstream")


def _no_api_scope(page: Document) -> Scope:
    """What an answer without an index is about: the endpoint (no API on the upstream),
    the subject (unknown to it: its API still serves others), else perhaps the
    repository (Docker Hub's 404 NOT_FOUND)."""
    if page.status in NO_ENDPOINT or (page.status == 404 and page.error_code is None):
        return "upstream"
    if page.error_code == SUBJECT_UNKNOWN:
        return "subject"
    return "repository"


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


# The answer when nothing refers to a subject, the most common one: parsed once (here,
# once the functions it needs are defined).
EMPTY = merge_pages([EMPTY_INDEX])
