"""Tag lists as the spec pages them, whatever the upstream does.

The mirror asks the upstream for a repository's whole tag list at most once per tag TTL,
following the upstream's own `Link` pages (replicas: one of them asks, under the lease
`taglist:<upstream>/<repo>`, the others read what it kept), and keeps it like a tag
(`ManifestService.remember`, one record per repository and upstream, under a key no tag
can take). Every page a client asks for is cut here from that list: lexical order, after
`last` (excluded), at most `n`, with a `Link` to the next page while more remain.
Distribution 2.8 ignores `n` and `last` and answers in storage order, so relaying it
breaks paging; query variants (`n`, `last`, unknown parameters) all share the one list.
While the upstream fails, the kept list is served stale (`Warning: 110`) within
`stale_if_error`.

What an upstream can make the mirror hold is bounded: at most MAX_PAGES pages,
MAX_LIST_BYTES bytes of JSON across them and MAX_TAGS tags. Past any bound the list is
refused (502) rather than cut short, since a shortened list would look whole. The pages
together must come within the upstream's paging deadline (a few exchanges' worth), past
which the upstream counts as failed: the kept list is served stale, else 503.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from urllib.parse import SplitResult, urlsplit

from mirror.cache.manifests import LOOKUP_FAILED, ManifestService
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    ManifestInvalid,
    PaginationNumberInvalid,
    TagInvalid,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.oci.reference import TAG_RE
from mirror.upstream.client import Upstream
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

KEPT_TYPE = "application/vnd.mirror.taglist+json"
# Where a repository's whole list is kept: `+` is in no tag, so no real tag can collide.
KEPT_KEY = "tags+whole"
# A client's `n` above this is cut to it (the catalog's cap too).
MAX_PAGE_SIZE = 10000
# Bounds on one upstream fetch of a whole list (every page of it together).
MAX_PAGES = 200
MAX_LIST_BYTES = 8 * 1024 * 1024
MAX_TAGS = 100_000
# Parsed kept lists, by digest, so paging through a long list parses it once.
PARSED_TAGS = 2 * MAX_TAGS
_NUMBER = re.compile(r"[0-9]{1,12}")
# Which tags a page may hold (the pull policy's, for the asking client); None: every one.
Shown = Callable[[str], bool] | None


@dataclass(frozen=True, slots=True)
class TagPage:
    """One page of a repository's tags."""

    tags: list[str]
    more: bool  # tags follow this page (a `Link` to the next one is due)
    stale: bool = False  # cut from a list kept past its TTL: the upstream failed
    fresh_for: float = 0.0  # seconds left of the list's TTL


def parse_n(value: str | None) -> int | None:
    """The `n` query parameter: absent, or a non-negative integer (capped)."""
    if value is None:
        return None
    if not _NUMBER.fullmatch(value):
        raise PaginationNumberInvalid("n must be a non-negative integer", {"n": value[:20]})
    return min(int(value), MAX_PAGE_SIZE)


def parse_last(value: str | None) -> str | None:
    """The `last` query parameter: absent (or empty), or a tag."""
    if not value:
        return None
    if not TAG_RE.fullmatch(value):
        raise TagInvalid("last must be a tag", {"last": value[:140]})
    return value


def cut(
    tags: tuple[str, ...], n: int | None, last: str | None, shown: Shown = None
) -> tuple[list[str], bool]:
    """The page of a sorted list after `last`, at most `n`, and whether more follow; with
    `shown`, of the tags it lets through (those after the page are looked at one by one
    only until one passes)."""
    start = bisect.bisect_right(tags, last) if last else 0
    if shown is not None:
        passed = (tags[i] for i in range(start, len(tags)) if shown(tags[i]))
        if n is None:
            return list(passed), False
        page = list(islice(passed, n))
        return page, bool(page) and next(passed, None) is not None
    if n is None:
        return list(tags[start:]), False
    page = list(tags[start : start + n])
    return page, bool(page) and start + n < len(tags)


class TagListService:
    """Answers tag-list pages from one kept whole list per repository and upstream."""

    def __init__(self, manifests: ManifestService, metrics: Metrics) -> None:
        self._manifests = manifests
        self._metrics = metrics
        # Concurrent requests for an expired list make one upstream fetch sequence.
        self._flight = SingleFlight()
        self._parsed: LRU[str, tuple[str, ...]] = LRU(PARSED_TAGS, lambda v: len(v) + 1)

    async def close(self) -> None:
        await self._flight.close()

    async def get(
        self, upstream: Upstream, repo: str, n: int | None, last: str | None, shown: Shown = None
    ) -> TagPage:
        """A page of the whole list (of the tags `shown` lets through, with it)."""
        ttl = self._manifests.ttl_of(upstream)
        kept = await self._kept(upstream, repo)
        if kept is not None and time.time() - kept[0] < ttl:
            return TagPage(*cut(kept[1], n, last, shown), fresh_for=ttl - (time.time() - kept[0]))
        seen = None if kept is None else kept[0]
        try:
            tags = await self._flight.do(
                (upstream.name, repo),
                lambda: self._manifests.shared.once(
                    "taglist",
                    f"taglist:{upstream.name}/{repo}",
                    lambda: self._refreshed_elsewhere(upstream, repo, seen),
                    lambda: self._refresh(upstream, repo),
                    LOOKUP_FAILED,
                ),
            )
        except (UpstreamUnavailable, TooManyRequests):
            window = ttl + self._manifests.stale_if_error
            if kept is None or time.time() - kept[0] >= window:
                raise
            self._metrics.stale_served.labels("tags").inc()
            return TagPage(*cut(kept[1], n, last, shown), stale=True)
        return TagPage(*cut(tags, n, last, shown), fresh_for=ttl)

    async def _kept(self, upstream: Upstream, repo: str) -> tuple[float, tuple[str, ...]] | None:
        """When the kept list was fetched, and its tags; None when none is kept."""
        kept = await self._manifests.recall(upstream, repo, KEPT_KEY)
        if kept is None:
            return None
        record, body = kept
        tags = self._parsed.get(record.digest)
        if tags is None:
            try:
                tags = tuple(json.loads(body)["tags"])
            except (ValueError, LookupError, TypeError):
                return None
            self._parsed.put(record.digest, tags)
        return record.checked_at, tags

    async def _refreshed_elsewhere(
        self, upstream: Upstream, repo: str, seen: float | None
    ) -> tuple[str, ...] | None:
        """The list another replica kept since the one fetched at `seen` (compared for a
        change, not an order: replicas' clocks may differ)."""
        kept = await self._kept(upstream, repo)
        return None if kept is None or kept[0] == seen else kept[1]

    async def _refresh(self, upstream: Upstream, repo: str) -> tuple[str, ...]:
        """Fetch the whole list from the upstream and keep it."""
        tags = tuple(await fetch_whole(upstream, repo))
        body = json.dumps({"tags": tags}).encode()
        record = await self._manifests.remember(upstream, repo, KEPT_KEY, KEPT_TYPE, body)
        self._parsed.put(record.digest, tags)
        return tags


async def fetch_whole(upstream: Upstream, repo: str) -> list[str]:
    """Every tag of `repo` upstream, sorted: its pages followed, within the bounds and
    the paging deadline (UpstreamUnavailable past it, so a kept list is served stale)."""
    async with upstream.within_paging_deadline(f"the tag list of {repo}"):
        return await _fetch_pages(upstream, repo)


async def _fetch_pages(upstream: Upstream, repo: str) -> list[str]:
    path: str | None = f"/v2/{repo}/tags/list"
    seen: set[str] = set()
    tags: set[str] = set()
    budget = MAX_LIST_BYTES
    while path is not None:
        if len(seen) == MAX_PAGES:
            raise ManifestInvalid(f"the tag list of {repo} runs past {MAX_PAGES} pages")
        seen.add(path)
        body, link = await _page(upstream, repo, path, budget)
        budget -= len(body)
        tags.update(_tags_of(body, repo))
        if len(tags) > MAX_TAGS:
            raise ManifestInvalid(f"the tag list of {repo} holds more than {MAX_TAGS} tags")
        path = next_path(link, upstream, repo)
        if path in seen:
            raise ManifestInvalid(f"the tag list of {repo} links back to a page already read")
    return sorted(tags)


async def _page(upstream: Upstream, repo: str, path: str, budget: int) -> tuple[bytes, str | None]:
    """One page of the upstream's list (at most `budget` bytes) and its `Link`."""
    page = await upstream.document(path, repo, "tags", accept="application/json", limit=budget)
    return page.body, page.link


def _tags_of(body: bytes, repo: str) -> list[str]:
    """The tags of one upstream page; what is no tag by the grammar is left out."""
    try:
        listing = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        listing = None
    tags = listing.get("tags") if isinstance(listing, dict) else ()
    if not isinstance(tags, list):
        if tags is None:  # distribution answers `"tags": null` for a repository without any
            return []
        raise ManifestInvalid(f"the upstream's answer for the tags of {repo} is no tag list")
    return [tag for tag in tags if isinstance(tag, str) and TAG_RE.fullmatch(tag)]


def next_path(link: str | None, upstream: Upstream, repo: str) -> str | None:
    """The path and query of the upstream's next page, None after the last one.

    Only the path and query of the link are used, always asked of the upstream itself: a
    link to another host gets no request (nor token), and one that leaves this
    repository's tag list is refused."""
    target = None
    for part in (link or "").split(","):
        if re.search(r';\s*rel="?next"?', part):
            target = _split(part.partition(">")[0].strip(" <"), repo)
    if target is None:
        return None
    path = target.path.removeprefix(urlsplit(upstream.url).path)
    if path != f"/v2/{repo}/tags/list":
        raise ManifestInvalid(f"the upstream's next page of the tags of {repo} is elsewhere")
    return path + (f"?{target.query}" if target.query else "")


def _split(url: str, repo: str) -> SplitResult:
    """The parts of a `Link` URL; ManifestInvalid when it is none (`http://[::1/`)."""
    try:
        return urlsplit(url)
    except ValueError:
        raise ManifestInvalid(f"the upstream's next page of the tags of {repo} is no URL") from None
