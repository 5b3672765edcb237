"""What the upstream store holds for the bench: the 20-layer image and a few 512 MiB blobs.

Each large blob is random bytes (incompressible, distinct per seed) and the only layer of a
`library/bigN:latest` image, so both the mirror and the peer can reach it by repository.
Blobs are built in memory one at a time and pushed over the registry's API.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tests.images import (
    DOCKER_LAYER,
    Blob,
    Layer,
    many_layers_image,
    push_image,
    single_image,
)

MIB = 1024 * 1024
BIG_SIZE = 512 * MIB
_CHUNK = 16 * MIB  # randbytes() cannot make 512 MiB in one call


@dataclass(frozen=True)
class BigBlob:
    """One large layer in the upstream: where to ask for it and what it is."""

    repo: str  # "library/big3"
    digest: str
    size: int

    def path(self) -> str:
        """The blob's API path on any registry that serves this repository."""
        return f"/v2/{self.repo}/blobs/{self.digest}"


def random_bytes(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(_CHUNK, size - at)) for at in range(0, size, _CHUNK))


def seed_big(
    registry_url: str, index: int, size: int = BIG_SIZE, keep: Path | None = None
) -> BigBlob:
    """Push `library/big<index>:latest` with one random layer; write its bytes to keep too."""
    data = random_bytes(size, seed=1000 + index)
    blob = Blob.of(DOCKER_LAYER, data)
    if keep is not None:
        keep.write_bytes(data)
    # The layer is not a tar: no client unpacks it, and registries do not look inside.
    image = single_image(f"big{index}", [Layer(blob, diff_id=blob.digest)])
    repo = f"library/big{index}"
    push_image(registry_url, repo, "latest", image)
    return BigBlob(repo, blob.digest, blob.size)


def seed_layers20(registry_url: str) -> str:
    """Push tests.images' 20-layer image as library/layers20:latest; its manifest digest."""
    image = many_layers_image(20)
    push_image(registry_url, "library/layers20", "latest", image)
    return image.manifest.digest
