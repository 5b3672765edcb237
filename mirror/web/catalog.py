"""`GET /v2/_catalog`: the repositories holding cached content that the client may pull.

With a pull policy, a client is shown only the repositories it could pull: the names of
the others are the operator's business (a private repository's name says a lot). The
page is cut after the filter, so `n` and `last` page through what this client sees.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from mirror.oci.errors import NameInvalid, RegistryError
from mirror.web.gate import gate_key, subject_key
from mirror.web.keys import metadata_key, upstreams_key

MAX_CATALOG_PAGE = 10000
# Names read from the store at a time while a page is filled past the refused ones.
SCAN_BATCH = 1000


async def catalog(request: web.Request) -> web.Response:
    """The repositories this mirror holds content for, in lexical pages."""
    try:
        n = min(int(request.query.get("n", "1000")), MAX_CATALOG_PAGE)
    except ValueError:
        raise NameInvalid("n must be a number") from None
    last = request.query.get("last") or None
    names = await visible_page(request.app, request.get(subject_key, ""), max(n, 0), last)
    headers = {}
    if names and len(names) == n:
        headers["Link"] = f'</v2/_catalog?{urlencode({"last": names[-1], "n": n})}>; rel="next"'
    return web.json_response({"repositories": names}, headers=headers)


async def visible_page(app: web.Application, subject: str, n: int, last: str | None) -> list[str]:
    """Up to `n` names after `last` that `subject` may pull, in lexical order."""
    metadata = app[metadata_key]
    if app[gate_key].policy is None:
        return await metadata.repositories(n, last)
    page: list[str] = []
    while len(page) < n:
        batch = await metadata.repositories(SCAN_BATCH, last)
        for name in batch:
            if may_list(app, subject, name):
                page.append(name)
                if len(page) == n:
                    break
        if len(batch) < SCAN_BATCH:
            break
        last = batch[-1]
    return page


def may_list(app: web.Application, subject: str, name: str) -> bool:
    """Whether `subject` may pull the repository a catalogue name stands for."""
    gate = app[gate_key]
    if gate.policy is None:
        return True
    try:
        upstream, repository = app[upstreams_key].route(name, None)
    except RegistryError:
        return False
    # Asked of the policy itself: a catalogue walk would crowd the gate's remembered
    # decisions (those of requests being pulled) out of its bounded memory.
    return gate.policy.refusal(subject, gate.target(upstream, repository)) is None
