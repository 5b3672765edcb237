"""Which manifest a client gets for its `Accept`, as the distribution registry decides it.

The mirror always asks its upstream for every manifest type, so one tag has one cached
object whatever the client; this module then decides, per media type, what this client
gets (what distribution v3's `GetManifest` does, tried against docker-registry 2.8 too):

- OCI manifest, OCI index: only when the type is named. No Accept, `*/*` or other types:
  404 MANIFEST_UNKNOWN "OCI ... found, but accept header does not support ..." (the
  distribution registry and Docker Hub alike).
- Docker manifest list: by digest, always (those exact bytes were asked for). By tag, when
  named; else the linux/amd64 manifest it lists, as distribution and Docker Hub do for
  clients that predate lists.
- Docker schema 2 manifest: when named, or when the Accept names no manifest type at all
  (no Accept, `*/*`): distribution v3 serves it to anyone; Docker Hub down-converted it
  to schema 1, which no longer exists.

Where this differs from them on purpose: a client that names manifest types, none of
them schema 2 (an OCI-only client), gets 404 for a schema 2 manifest by tag or digest
(distribution v3 sends it anyway; 2.8 answers 400 MANIFEST_INVALID by tag), and for a
manifest list by tag (distribution: 400 MANIFEST_INVALID): a type it said it cannot read
is "not found in a form you accept", which clients already handle as a fallback.
"""

from __future__ import annotations

import enum
import json

from mirror.oci.errors import ManifestUnknown

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Every manifest type the mirror knows, in the order it asks its upstreams for them.
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
# The distribution registry refuses manifests over 4 MiB; the mirror reads none larger,
# from an upstream or its bucket, to bound memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_OCI_REFUSALS = {
    OCI_MANIFEST: "OCI manifest found, but accept header does not support OCI manifests",
    OCI_INDEX: "OCI index found, but accept header does not support OCI indexes",
}
DEFAULT_PLATFORM = ("linux", "amd64")


class Verdict(enum.Enum):
    SERVE = "serve"  # the manifest as it is
    PLATFORM = "platform"  # the linux/amd64 manifest a list names, in its place


# Accept values read per request, over all its Accept lines: clients send a handful. What
# lies past this many is not read, so a request of many long lines costs no more than one.
MAX_ACCEPT_VALUES = 32
# parse_accept's answers are kept by Accept lines (a fleet's clients send the same few on
# every manifest request), but only for lines this short in all, and this many of them
# (the oldest dropped first): any client may send long ones, all different.
KEPT_ACCEPT_CHARS = 1024
KEPT_ACCEPT_LINES = 8
KEPT_ACCEPTS = 256
_KNOWN = frozenset(MANIFEST_TYPES)
_kept: dict[tuple[str, ...], tuple[str, ...]] = {}


def parse_accept(values: tuple[str, ...]) -> tuple[str, ...]:
    """The manifest types the mirror knows that the Accept lines name, in MANIFEST_TYPES
    order: all that `decide` reads (`*/*`, other types and `;q=` change nothing, as in
    distribution, which reads no q-value either)."""
    if len(values) > KEPT_ACCEPT_LINES:
        return _named(values)
    named = _kept.get(values)
    if named is None:
        named = _named(values)
        if sum(map(len, values)) <= KEPT_ACCEPT_CHARS:
            if len(_kept) >= KEPT_ACCEPTS:
                del _kept[next(iter(_kept))]
            _kept[values] = named
    return named


def _named(values: tuple[str, ...]) -> tuple[str, ...]:
    """parse_accept, reading at most MAX_ACCEPT_VALUES values."""
    found: set[str] = set()
    left = MAX_ACCEPT_VALUES
    for value in values:
        if left <= 0:
            break
        parts = value.split(",", left)  # past `left` values: one unread remainder
        for part in parts[:left]:
            media_type = part.partition(";")[0].strip()
            if media_type in _KNOWN:
                found.add(media_type)
        left -= len(parts)
    return tuple(media_type for media_type in MANIFEST_TYPES if media_type in found)


def decide(media_type: str, accept: tuple[str, ...], *, by_tag: bool) -> Verdict:
    """What a client with `accept` (as parse_accept gives it) gets for a manifest of
    `media_type`, or ManifestUnknown when it gets nothing."""
    verdict = _DECISIONS.get((media_type, accept, by_tag))
    if verdict is None:  # a type the mirror does not know, or another form of Accept
        verdict = _verdict(media_type, _KNOWN.intersection(accept), by_tag)
    if isinstance(verdict, str):
        raise ManifestUnknown(verdict)
    return verdict


def _verdict(media_type: str, named: frozenset[str], by_tag: bool) -> Verdict | str:
    """`decide` from the known types named; a refusal is its message."""
    if media_type in named:
        return Verdict.SERVE
    if media_type in _OCI_REFUSALS:
        return _OCI_REFUSALS[media_type]
    understands_schema2 = not named or DOCKER_MANIFEST in named
    if media_type == DOCKER_LIST:
        if not by_tag:
            return Verdict.SERVE
        if understands_schema2:
            return Verdict.PLATFORM
        return "manifest list found, but accept header does not support lists"
    if media_type == DOCKER_MANIFEST and not understands_schema2:
        return "schema 2 manifest found, but accept header does not support it"
    return Verdict.SERVE  # schema 2 for a client naming no type; or a type we do not know


# Every verdict for a known type and an Accept as parse_accept gives it, worked out once:
# 4 types x 16 subsets x 2, nothing a client sends added to it.
_DECISIONS: dict[tuple[str, tuple[str, ...], bool], Verdict | str] = {
    (media_type, accept, by_tag): _verdict(media_type, frozenset(accept), by_tag)
    for media_type in MANIFEST_TYPES
    for accept in (
        tuple(t for i, t in enumerate(MANIFEST_TYPES) if mask >> i & 1) for mask in range(16)
    )
    for by_tag in (False, True)
}


def manifest_media_type(declared: str, body: bytes | None) -> str | None:
    """The media type to keep and serve a manifest under: the declared one (an upstream's
    Content-Type) when it is a manifest type the mirror knows, else the `mediaType` the
    body names when that is one; None when neither is (text/html is never served)."""
    if declared in MANIFEST_TYPES:
        return declared
    try:
        named = json.loads(body).get("mediaType") if body else None
    except (ValueError, AttributeError, RecursionError):  # nested past the parser's depth
        return None
    return named if named in MANIFEST_TYPES else None


def default_platform(list_body: bytes) -> str:
    """The digest of the linux/amd64 manifest in a manifest list, or ManifestUnknown."""
    try:
        entries = json.loads(list_body).get("manifests", [])
    except (ValueError, AttributeError, RecursionError):
        entries = []
    for entry in entries if isinstance(entries, list) else []:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):  # "platform": "linux" describes none
            continue
        if (platform.get("os"), platform.get("architecture")) == DEFAULT_PLATFORM:
            digest = entry.get("digest")
            if isinstance(digest, str):
                return digest
    raise ManifestUnknown("manifest list has no linux/amd64 manifest for this client")
