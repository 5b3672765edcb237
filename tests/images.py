"""Real container images built in Python and pushed to a registry over its HTTP API.

Layers are deterministic gzipped tars (fixed mtimes, owners and gzip header), so every build
yields the same digests. Pushing uses the plain synchronous `http.client`: the helpers run
from fixtures before any event loop matters, and a file body streams in 1 MiB blocks.

    seed(registry_url) -> {"busybox": SeededImage, "multiarch": ..., "layers20": ..., "large": ...}
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import subprocess
import tarfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

BUSYBOX = Path("/bin/busybox")
BUSYBOX_LINKS = ("sh", "echo", "ls", "cat", "true")
MIB = 1024 * 1024
LARGE_SIZE = 256 * MIB
CACHE_DIR = Path(os.environ.get("MIRROR_TEST_IMAGE_CACHE", "/tmp/mirror-test-images"))
MTIME = 1_700_000_000  # any fixed time: layer digests must not depend on the build time

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_GO_ARCH = {"amd64": "amd64", "arm64": "arm64", "armhf": "arm", "i386": "386"}


@functools.cache
def host_arch() -> str:
    """The host's architecture as Go (and image configs) spell it."""
    try:
        deb = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        deb = "amd64"
    return _GO_ARCH.get(deb, deb)


# --- content ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Content addressed by digest: bytes in memory, or a file for large layers."""

    media_type: str
    digest: str
    size: int
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, sha256(data), len(data), data)

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb")

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def as_type(self, media_type: str) -> Blob:
        """The same bytes under another media type (Docker vs OCI layers are byte-equal)."""
        return dataclasses.replace(self, media_type=media_type)


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str  # sha256 of the uncompressed tar, listed in the image config


@dataclass(frozen=True)
class Image:
    """One pushable thing: its blobs, child manifests (of an index) and top manifest."""

    manifest: Blob
    blobs: tuple[Blob, ...]
    children: tuple[tuple[str, Blob], ...] = ()  # (platform "os/arch", manifest)
    # What a client on this host downloads: its platform's config and layers.
    host_config: str = ""
    host_layers: tuple[Blob, ...] = ()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: Writable) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Entry:
    """One tar member: a file (data), a directory or a symlink."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    symlink: str | None = None
    is_dir: bool = False
    reader: Readable | None = None  # streams `size` bytes instead of data
    size: int = 0


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.mtime, info.mode, info.uid, info.gid = MTIME, entry.mode, 0, 0
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
    elif entry.symlink is not None:
        info.type, info.linkname = tarfile.SYMTYPE, entry.symlink
    else:
        info.size = entry.size if entry.reader is not None else len(entry.data)
    return info


def write_layer(out: IO[bytes], entries: Iterable[Entry], level: int = 6) -> tuple[str, str, int]:
    """Write a gzipped tar of entries to out; return (digest, diff_id, compressed size)."""
    gz_out = _HashingWriter(out)
    # filename="" and mtime=0 keep the gzip header free of build-time detail.
    with gzip.GzipFile("", "wb", level, gz_out, mtime=0) as gz:
        tar_out = _HashingWriter(gz)
        # Stream mode ("w|") only ever calls write(); typeshed asks for a full file.
        stream = cast(IO[bytes], tar_out)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for entry in entries:
                body = entry.reader or (io.BytesIO(entry.data) if not entry.is_dir else None)
                tar.addfile(_tarinfo(entry), body)
    return gz_out.digest, tar_out.digest, gz_out.size


def layer_from_entries(entries: Iterable[Entry], media_type: str = DOCKER_LAYER) -> Layer:
    buf = io.BytesIO()
    digest, diff_id, size = write_layer(buf, entries)
    return Layer(Blob(media_type, digest, size, buf.getvalue()), diff_id)


@functools.cache
def busybox_layer() -> Layer:
    """/bin/busybox plus the applet symlinks the tests run."""
    entries = [Entry("bin", mode=0o755, is_dir=True)]
    entries.append(Entry("bin/busybox", BUSYBOX.read_bytes(), mode=0o755))
    entries += [Entry(f"bin/{name}", mode=0o777, symlink="busybox") for name in BUSYBOX_LINKS]
    return layer_from_entries(entries)


def file_layer(name: str, text: str) -> Layer:
    return layer_from_entries([Entry(name, text.encode())])


# --- images -------------------------------------------------------------------------------


def image_config(layers: Iterable[Layer], arch: str, oci: bool, title: str) -> Blob:
    """An image config; the title label keeps images that share layers apart (own IDs)."""
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Cmd": ["sh"],
            "Labels": {"org.opencontainers.image.title": title},
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    return Blob.of(OCI_CONFIG if oci else DOCKER_CONFIG, canonical_json(config))


def single_image(title: str, layers: list[Layer], arch: str = "", oci: bool = False) -> Image:
    """A single-platform image: Docker schema2, or OCI when oci is set."""
    arch = arch or host_arch()
    config = image_config(layers, arch, oci, title)
    layer_type = OCI_LAYER if oci else DOCKER_LAYER
    blobs = tuple(layer.blob.as_type(layer_type) for layer in layers)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [blob.descriptor() for blob in blobs],
    }
    manifest_blob = Blob.of(OCI_MANIFEST if oci else DOCKER_MANIFEST, canonical_json(manifest))
    return Image(manifest_blob, (config, *blobs), host_config=config.digest, host_layers=blobs)


def busybox_image() -> Image:
    """A runnable busybox: Docker schema2, one layer, Cmd ["sh"]."""
    return single_image("busybox", [busybox_layer()])


def multiarch_index() -> Image:
    """An OCI index: the runnable busybox for this host and a tiny arm64 (or amd64) image."""
    other = "arm64" if host_arch() != "arm64" else "amd64"
    images = {
        host_arch(): single_image("multiarch", [busybox_layer()], host_arch(), oci=True),
        other: single_image("multiarch", [file_layer("hello.txt", other)], other, oci=True),
    }
    entries = []
    for arch in sorted(images):
        platform = {"architecture": arch, "os": "linux"} | (
            {"variant": "v8"} if arch == "arm64" else {}
        )
        entries.append(images[arch].manifest.descriptor(platform=platform))
    index = Blob.of(
        OCI_INDEX,
        canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    host = images[host_arch()]
    return Image(
        index,
        tuple(blob for arch in sorted(images) for blob in images[arch].blobs),
        children=tuple((f"linux/{arch}", images[arch].manifest) for arch in sorted(images)),
        host_config=host.host_config,
        host_layers=host.host_layers,
    )


def many_layers_image(n: int = 20) -> Image:
    """The busybox layer under n small distinct layers, one file each."""
    extra = [file_layer(f"layers/{i:02d}.txt", f"layer {i} of {n}\n") for i in range(n)]
    return single_image(f"layers{n}", [busybox_layer(), *extra])


def large_layer_image(size: int = LARGE_SIZE, cache_dir: Path | None = None) -> Image:
    """The busybox layer plus a layer holding `size` bytes of incompressible data."""
    return single_image("large", [busybox_layer(), large_layer(size, cache_dir or CACHE_DIR)])


class _RandomReader:
    """`size` deterministic pseudo-random bytes, read in chunks (fast, incompressible)."""

    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.rng = random.Random(seed)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def large_layer(size: int, cache_dir: Path, seed: int = 1) -> Layer:
    """Build the large layer once into cache_dir, keyed by its parameters."""
    key = f"large-v1-{size}-{seed}"
    blob_path, meta_path = cache_dir / f"{key}.tar.gz", cache_dir / f"{key}.json"
    if meta_path.exists() and blob_path.exists():
        meta = json.loads(meta_path.read_text())
        if blob_path.stat().st_size == meta["size"]:
            return Layer(
                Blob(DOCKER_LAYER, meta["digest"], meta["size"], path=blob_path), meta["diff_id"]
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = blob_path.with_name(f"{blob_path.name}.{os.getpid()}.tmp")
    entry = Entry("data/random.bin", reader=_RandomReader(size, seed), size=size)
    try:
        with tmp.open("wb") as out:
            # Level 0: random data does not compress, and deflate at level 1 costs ~20 s/GiB.
            digest, diff_id, gz_size = write_layer(out, [entry], level=0)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, blob_path)  # atomic, so a concurrent build never sees half a file
    meta_path.write_text(json.dumps({"digest": digest, "diff_id": diff_id, "size": gz_size}))
    return Layer(Blob(DOCKER_LAYER, digest, gz_size, path=blob_path), diff_id)


# --- pushing ------------------------------------------------------------------------------


class PushError(RuntimeError):
    """The registry refused a push."""


def _request(
    method: str,
    url: str,
    body: IO[bytes] | bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=120, blocksize=MIB)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _expect(status: int, want: int, what: str, body: bytes) -> None:
    if status != want:
        raise PushError(f"{what}: HTTP {status} (wanted {want}): {body[:500]!r}")


def push_blob(registry: str, repo: str, blob: Blob) -> None:
    """Monolithic upload (POST then PUT ?digest=), skipped when the blob is already there."""
    status, _, _ = _request("HEAD", f"{registry}/v2/{repo}/blobs/{blob.digest}")
    if status == 200:
        return
    status, headers, body = _request("POST", f"{registry}/v2/{repo}/blobs/uploads/")
    _expect(status, 202, f"start upload of {blob.digest} to {repo}", body)
    location = urllib.parse.urljoin(f"{registry}/", headers["Location"])
    sep = "&" if "?" in location else "?"
    with blob.open() as data:
        status, _, body = _request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(blob.digest)}",
            body=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
        )
    _expect(status, 201, f"upload {blob.digest} to {repo}", body)


def push_manifest(registry: str, repo: str, ref: str, manifest: Blob) -> None:
    assert manifest.data is not None
    status, _, body = _request(
        "PUT",
        f"{registry}/v2/{repo}/manifests/{ref}",
        body=manifest.data,
        headers={"Content-Type": manifest.media_type},
    )
    _expect(status, 201, f"put manifest {repo}:{ref}", body)


def manifest_digest(registry: str, repo: str, ref: str, media_type: str) -> str | None:
    """The digest the registry holds for repo:ref, or None."""
    status, headers, _ = _request(
        "HEAD", f"{registry}/v2/{repo}/manifests/{ref}", headers={"Accept": media_type}
    )
    return headers.get("Docker-Content-Digest") if status == 200 else None


def push_image(registry: str, repo: str, tag: str, image: Image) -> None:
    """Push blobs, child manifests (by digest) and the top manifest (by tag); idempotent."""
    if manifest_digest(registry, repo, tag, image.manifest.media_type) == image.manifest.digest:
        return
    for blob in image.blobs:
        push_blob(registry, repo, blob)
    for _, child in image.children:
        push_manifest(registry, repo, child.digest, child)
    push_manifest(registry, repo, tag, image.manifest)


# --- seeding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeededImage:
    """What seed() pushed for one image, for tests to compare against."""

    repo: str  # "library/busybox"
    tag: str
    digest: str  # of the top manifest (an index for multiarch)
    media_type: str
    config: str  # the host platform's config digest
    layers: tuple[tuple[str, int], ...]  # the host platform's (digest, size), in order
    children: dict[str, str] = field(default_factory=dict)  # "linux/arm64" -> digest
    blobs: tuple[str, ...] = ()  # every blob digest pushed, all platforms

    @property
    def docker_name(self) -> str:
        """The name `docker pull` takes (official images drop "library/")."""
        return self.repo.removeprefix("library/")

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"


def _describe(repo: str, tag: str, image: Image) -> SeededImage:
    return SeededImage(
        repo=repo,
        tag=tag,
        digest=image.manifest.digest,
        media_type=image.manifest.media_type,
        config=image.host_config,
        layers=tuple((b.digest, b.size) for b in image.host_layers),
        children={platform: m.digest for platform, m in image.children},
        blobs=tuple(b.digest for b in image.blobs),
    )


def all_images(large_size: int = LARGE_SIZE, cache_dir: Path | None = None) -> dict[str, Image]:
    """The four test images by short name."""
    return {
        "busybox": busybox_image(),
        "multiarch": multiarch_index(),
        "layers20": many_layers_image(20),
        "large": large_layer_image(large_size, cache_dir),
    }


def seed(
    registry_url: str, large_size: int = LARGE_SIZE, cache_dir: Path | None = None
) -> dict[str, SeededImage]:
    """Push the four test images as library/<name>:latest; idempotent."""
    registry_url = registry_url.rstrip("/")
    seeded = {}
    for name, image in all_images(large_size, cache_dir).items():
        repo = f"library/{name}"
        push_image(registry_url, repo, "latest", image)
        seeded[name] = _describe(repo, "latest", image)
    return seeded


# --- referrers ----------------------------------------------------------------------------

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def artifact(subject: Blob, artifact_type: str, payload: bytes) -> Image:
    """A signature or SBOM as cosign, notation and oras push it: an OCI manifest with
    artifactType, the empty config, one layer, and the subject it refers to."""
    empty = Blob.of(EMPTY_CONFIG, b"{}")
    layer = Blob.of(artifact_type, payload)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty.descriptor(),
        "layers": [layer.descriptor()],
        "subject": subject.descriptor(),
    }
    return Image(Blob.of(OCI_MANIFEST, canonical_json(manifest)), (empty, layer))


def push_referrers(
    registry: str, repo: str, subject: Blob, artifacts: list[tuple[str, bytes]]
) -> tuple[Blob, list[Blob]]:
    """Push artifacts for subject, and the referrers tag schema's index listing them under
    the tag `sha256-<hex>`, as signing tools do on a registry without the referrers API.
    Returns the index and the artifact manifests."""
    manifests = []
    for artifact_type, payload in artifacts:
        pushed = artifact(subject, artifact_type, payload)
        for blob in pushed.blobs:
            push_blob(registry, repo, blob)
        push_manifest(registry, repo, pushed.manifest.digest, pushed.manifest)
        manifests.append(pushed.manifest)
    entries = [
        manifest.descriptor(artifactType=artifact_type)
        for (artifact_type, _), manifest in zip(artifacts, manifests, strict=True)
    ]
    index = Blob.of(
        OCI_INDEX,
        canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    push_manifest(registry, repo, subject.digest.replace(":", "-"), index)
    return index, manifests
