"""HTTP validators and cache lifetimes: one ETag per object, whichever path served it.

A blob's or manifest's ETag is its digest, quoted: the same bytes carry the same ETag cold
or warm, GET or HEAD, from any storage backend or replica, so an HTTP cache in front of
the mirror stores them once and revalidates with `If-None-Match` for a 304. A tag is
mutable: its ETag is the digest it resolves to now, and its `Cache-Control` lasts no
longer than what is left of the tag's TTL. No `Last-Modified`: a file's mtime is when
this mirror last read it, which says nothing about the content.
"""

from __future__ import annotations

from aiohttp import web

# Content addressed by digest never changes: a year, and `immutable` so browsers and
# CDNs skip revalidating it. Not `public`: with client auth on, shared caches must not
# store answers to authenticated requests (RFC 9111 §3.5), and without it they may.
IMMUTABLE = "max-age=31536000, immutable"
# Part of a blob still downloading, its hash not yet checked: no cache may keep it, for
# `immutable` would make wrong bytes permanent (and the ETag would revalidate them).
UNVERIFIED = "no-store"
# Headers a 304 repeats from the 200 it stands for (RFC 9110 §15.4.5), plus the digest.
_NOT_MODIFIED_HEADERS = ("ETag", "Cache-Control", "Vary", "Docker-Content-Digest", "Warning")


def etag_of(digest: str) -> str:
    return f'"{digest}"'


def digest_headers(digest: str) -> dict[str, str]:
    """The headers every blob and manifest answer carries, cold or warm, 200 or 206."""
    return {"Docker-Content-Digest": digest, "ETag": etag_of(digest)}


def cache_control(fresh_for: float | None) -> str:
    """`IMMUTABLE` for content by digest (None); by tag, the seconds left of its TTL."""
    if fresh_for is None:
        return IMMUTABLE
    return f"max-age={max(int(fresh_for), 0)}"


def _entity_tags(values: list[str]) -> list[str]:
    """The entity tags of `If-None-Match` lines, weakness dropped (it compares weakly)."""
    tags = []
    for value in values:
        for item in value.split(","):
            item = item.strip().removeprefix("W/")
            if item:
                tags.append(item)
    return tags


def none_match(request: web.BaseRequest, digest: str) -> bool:
    """Whether `If-None-Match` names this digest's ETag, or `*`: the client's copy is good.

    An unquoted digest counts too, as the distribution registry accepts it.
    """
    tags = _entity_tags(request.headers.getall("If-None-Match", []))
    return "*" in tags or etag_of(digest) in tags or digest in tags


def range_allowed(request: web.BaseRequest, digest: str) -> bool:
    """Whether a `Range` may be honoured: no `If-Range`, or one naming this ETag exactly.

    A date, a weak or another ETag means the client's partial copy may be of other bytes:
    it gets the whole body (RFC 9110 §13.1.5). A date never matches: the mirror sends
    no `Last-Modified`, so a client has none to hold.
    """
    value = request.headers.get("If-Range")
    return value is None or value.strip() == etag_of(digest)


def not_modified(headers: dict[str, str]) -> web.Response:
    """A 304 standing for the 200 whose headers are given: no body, no length."""
    kept = {name: headers[name] for name in _NOT_MODIFIED_HEADERS if name in headers}
    return web.Response(status=304, headers=kept)
