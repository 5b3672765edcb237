"""Tag lists: always asked of the upstream, and kept for when it fails.

A tag list is live data (people list tags to see what is new), so every request goes
upstream. Each answer is also kept like a tag (`ManifestService.remember`, under a key no
tag can take), so while the upstream fails a repository's list is served stale, with
`Warning: 110`: the same page for the same `n`/`last`, or, once the whole list has been
seen, any page cut from it here with the `Link` to the next one, as the spec pages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from mirror.cache.manifests import ManifestService
from mirror.observe.metrics import Metrics
from mirror.oci.errors import TooManyRequests, UpstreamUnavailable
from mirror.oci.reference import TAG_RE
from mirror.upstream.client import Passthrough, Upstream

KEPT_TYPE = "application/vnd.mirror.taglist+json"


@dataclass(frozen=True, slots=True)
class TagList:
    answer: Passthrough  # as the upstream sent it (its Link still the upstream's)
    stale: bool = False


def kept_key(n: int | None, last: str | None) -> str:
    """`tags+<n>+<last>`: `+` is in no tag, so no real tag can collide."""
    return f"tags+{'' if n is None else n}+{last or ''}"


def page(listing: dict[str, Any], repo: str, n: int | None, last: str | None) -> Passthrough:
    """One page of a whole tag list, as a registry pages it: lexical, after `last`, at
    most `n`, with a `Link` to the next page when more follow."""
    tags = sorted(str(tag) for tag in listing.get("tags") or [])
    if last:
        tags = [tag for tag in tags if tag > last]
    link = None
    if n is not None and len(tags) > n:
        tags = tags[:n]
        if tags:
            query = urlencode({"last": tags[-1], "n": n})
            link = f'</v2/{repo}/tags/list?{query}>; rel="next"'
    body = json.dumps({"name": listing.get("name", repo), "tags": tags}).encode()
    return Passthrough(200, "application/json", body, link)


class TagListService:
    """Relays tag lists and keeps each answer for an upstream outage."""

    def __init__(self, manifests: ManifestService, metrics: Metrics) -> None:
        self._manifests = manifests
        self._metrics = metrics

    async def get(self, upstream: Upstream, repo: str, n: int | None, last: str | None) -> TagList:
        pairs = (("n", n), ("last", last))
        query = {key: str(value) for key, value in pairs if value is not None}
        path = f"/v2/{repo}/tags/list" + (f"?{urlencode(query)}" if query else "")
        # Only a `last` that is a tag makes a key; anything else is relayed, not kept.
        keep = last is None or TAG_RE.fullmatch(last) is not None
        try:
            answer = await upstream.passthrough(path, repo, "tags")
        except (UpstreamUnavailable, TooManyRequests):
            kept = await self._kept(upstream, repo, n, last) if keep else None
            if kept is None:
                raise
            self._metrics.stale_served.labels("tags").inc()
            return TagList(kept, stale=True)
        if answer.status == 200 and keep:
            document = {"body": answer.body.decode(errors="replace"), "link": answer.link}
            body = json.dumps(document).encode()
            await self._manifests.remember(upstream, repo, kept_key(n, last), KEPT_TYPE, body)
        return TagList(answer)

    async def _kept(
        self, upstream: Upstream, repo: str, n: int | None, last: str | None
    ) -> Passthrough | None:
        """The kept answer to this very query, else a page of the kept whole list."""
        window = self._manifests.ttl_of(upstream) + self._manifests.stale_if_error
        exact = await self._recall(upstream, repo, kept_key(n, last), window)
        if exact is not None:
            return exact
        whole = await self._recall(upstream, repo, kept_key(None, None), window)
        if whole is None or whole.link is not None:  # not the whole list after all
            return None
        try:
            listing = json.loads(whole.body)
        except ValueError:
            return None
        return page(listing, repo, n, last) if isinstance(listing, dict) else None

    async def _recall(
        self, upstream: Upstream, repo: str, key: str, window: float
    ) -> Passthrough | None:
        kept = await self._manifests.recall(upstream, repo, key)
        if kept is None or not kept[0].is_fresh(window):
            return None
        document = json.loads(kept[1])
        return Passthrough(200, "application/json", document["body"].encode(), document["link"])
