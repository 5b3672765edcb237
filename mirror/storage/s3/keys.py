"""Where the mirror's objects live in its bucket, and what a key names: the layout, both ways.

    <prefix>blobs/<algorithm>/<hex>        a blob's bytes
    <prefix>manifests/<algorithm>/<hex>    a manifest's bytes (its media type: Content-Type)

A name read back from a key is "algorithm:hex" as the key spells it, not checked to be a
valid digest: a stray object under the prefix is the caller's to skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mirror.oci.reference import Digest

Kind = Literal["blobs", "manifests"]
KINDS: tuple[Kind, ...] = ("blobs", "manifests")


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The keys under one prefix (`storage.s3.prefix`)."""

    prefix: str

    def under(self, kind: Kind) -> str:
        """What every key of `kind` starts with (to list them)."""
        return f"{self.prefix}{kind}/"

    def key(self, kind: Kind, name: Digest | str) -> str:
        """The key of the object of `kind` named `name` ("algorithm:hex")."""
        algorithm, _, hexpart = str(name).partition(":")
        return f"{self.under(kind)}{algorithm}/{hexpart}"

    def blob(self, digest: Digest | str) -> str:
        return self.key("blobs", digest)

    def manifest(self, digest: Digest) -> str:
        return self.key("manifests", digest)

    def name(self, kind: Kind, key: str) -> str:
        """The "algorithm:hex" a key under `under(kind)` names."""
        return key[len(self.under(kind)) :].replace("/", ":", 1)

    def parse(self, key: str) -> tuple[Kind, str] | None:
        """(kind, name) of a key in this layout; None for any other key."""
        for kind in KINDS:
            if key.startswith(self.under(kind)):
                return kind, self.name(kind, key)
        return None
