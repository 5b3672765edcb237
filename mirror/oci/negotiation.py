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
import functools
import json

from mirror.oci.errors import ManifestUnknown

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Every manifest type the mirror knows, in the order it asks its upstreams for them.
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
_OCI_REFUSALS = {
    OCI_MANIFEST: "OCI manifest found, but accept header does not support OCI manifests",
    OCI_INDEX: "OCI index found, but accept header does not support OCI indexes",
}
DEFAULT_PLATFORM = ("linux", "amd64")


class Verdict(enum.Enum):
    SERVE = "serve"  # the manifest as it is
    PLATFORM = "platform"  # the linux/amd64 manifest a list names, in its place


@functools.lru_cache(maxsize=256)
def parse_accept(values: tuple[str, ...]) -> tuple[str, ...]:
    """Media types from every Accept header line, parameters (`;q=`) dropped. Kept per
    header: a fleet's clients send a handful of Accept values, on every manifest request."""
    types = []
    for value in values:
        for part in value.split(","):
            media_type = part.partition(";")[0].strip()
            if media_type:
                types.append(media_type)
    return tuple(types)


@functools.lru_cache(maxsize=1024)
def decide(media_type: str, accept: tuple[str, ...], *, by_tag: bool) -> Verdict:
    """What a client with `accept` gets for a manifest of `media_type`, or
    ManifestUnknown when it gets nothing."""
    named = set(MANIFEST_TYPES).intersection(accept)
    if media_type in named:
        return Verdict.SERVE
    if media_type in _OCI_REFUSALS:
        raise ManifestUnknown(_OCI_REFUSALS[media_type])
    understands_schema2 = not named or DOCKER_MANIFEST in named
    if media_type == DOCKER_LIST:
        if not by_tag:
            return Verdict.SERVE
        if understands_schema2:
            return Verdict.PLATFORM
        raise ManifestUnknown("manifest list found, but accept header does not support lists")
    if media_type == DOCKER_MANIFEST and not understands_schema2:
        raise ManifestUnknown("schema 2 manifest found, but accept header does not support it")
    return Verdict.SERVE  # schema 2 for a client naming no type; or a type we do not know


def manifest_media_type(declared: str, body: bytes | None) -> str | None:
    """The media type to keep and serve a manifest under: the declared one (an upstream's
    Content-Type) when it is a manifest type the mirror knows, else the `mediaType` the
    body names when that is one; None when neither is (text/html is never served)."""
    if declared in MANIFEST_TYPES:
        return declared
    try:
        named = json.loads(body).get("mediaType") if body else None
    except (ValueError, AttributeError):
        return None
    return named if named in MANIFEST_TYPES else None


def default_platform(list_body: bytes) -> str:
    """The digest of the linux/amd64 manifest in a manifest list, or ManifestUnknown."""
    try:
        entries = json.loads(list_body).get("manifests", [])
    except (ValueError, AttributeError):
        entries = []
    for entry in entries if isinstance(entries, list) else []:
        platform = entry.get("platform") or {} if isinstance(entry, dict) else {}
        if (platform.get("os"), platform.get("architecture")) == DEFAULT_PLATFORM:
            digest = entry.get("digest")
            if isinstance(digest, str):
                return digest
    raise ManifestUnknown("manifest list has no linux/amd64 manifest for this client")
