"""`GET /v2/<name>/tags/list`: a page of the repository's tags the client may pull.

A tag-specific deny (`library/*:internal-*`), or an allow or rule naming tags, refuses some
tags of a repository the client may otherwise pull: those are left out of the list before
it is paged (taglists.py), so `n`, `last` and `Link` page through what this client sees,
and a refused tag's name is not told. Where no glob for the repository names a tag or a
digest, nothing is filtered.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from mirror.cache.taglists import Shown, parse_last, parse_n
from mirror.upstream.client import Upstream
from mirror.web.conditional import cache_control
from mirror.web.gate import gate_key, route, subject_key
from mirror.web.handlers import STALE_WARNING
from mirror.web.keys import taglists_key


async def tags_list(request: web.Request) -> web.Response:
    """A page of the repository's tags, cut here from the whole list (taglists.py);
    the next-page Link keeps the name and `ns` the client used."""
    upstream, repo = route(request)
    n = parse_n(request.query.get("n"))
    last = parse_last(request.query.get("last"))
    shown = pullable_tags(request, upstream, repo)
    found = await request.app[taglists_key].get(upstream, repo, n, last, shown)
    name = request.match_info["name"]
    headers = {"Cache-Control": cache_control(found.fresh_for)}
    if found.stale:
        headers["Warning"] = STALE_WARNING
    if found.more and n is not None:
        query = {"last": found.tags[-1], "n": n}
        if "ns" in request.query:  # containerd following it stays on this upstream
            query["ns"] = request.query["ns"]
        headers["Link"] = f'</v2/{name}/tags/list?{urlencode(query)}>; rel="next"'
    return web.json_response({"name": name, "tags": found.tags}, headers=headers)


def pullable_tags(request: web.Request, upstream: Upstream, repo: str) -> Shown:
    """The tags the asking client may pull by tag (None: every one)."""
    gate = request.app[gate_key]
    if gate.policy is None:
        return None
    # Asked of the policy itself, as the catalogue does: one decision per tag would crowd
    # the gate's remembered ones out of its bounded memory.
    return gate.policy.tag_filter(request.get(subject_key, ""), gate.target(upstream, repo))
