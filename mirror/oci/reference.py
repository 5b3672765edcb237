"""Repository names, tags and digests, validated before anything touches the disk.

The grammar is the OCI distribution spec's. A validated `Digest` is the only thing ever
turned into a file name, so a request path can never reach outside the storage directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.oci.errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Digest:
    """`algorithm:hex`, with the hex length the algorithm demands."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def parse_digest(value: str) -> Digest:
    """A `Digest`, or `DigestInvalid` naming what is wrong."""
    digest = as_digest(value)
    if digest is not None:
        return digest
    algorithm, sep, _ = value.partition(":")
    if not sep or algorithm not in _HEX_LENGTH:
        raise DigestInvalid(f"unsupported digest algorithm in {value[:80]!r}")
    raise DigestInvalid(f"invalid {algorithm} digest {value[:150]!r}")


def as_digest(value: str) -> Digest | None:
    """The `Digest` `value` spells, or None (a name in storage that is not one of ours)."""
    algorithm, sep, hexpart = value.partition(":")
    length = _HEX_LENGTH.get(algorithm)
    if not sep or len(hexpart) != length or not _HEX_RE.fullmatch(hexpart):
        return None
    return Digest(algorithm, hexpart)


def compute_digest(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def validate_name(name: str) -> str:
    if not is_valid_name(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}")
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:150]!r}")
    return tag


def is_digest_reference(reference: str) -> bool:
    """A manifest reference is a digest when it has a colon; tags cannot contain one."""
    return ":" in reference
