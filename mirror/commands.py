"""The commands besides `serve`: warm, ls, gc and verify, run without a server.

Each builds the same application `serve` would (same storage, metadata and upstreams),
starts its resources without listening, and uses its services directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from mirror.cache.downloads import Download, Uncacheable
from mirror.cache.holdings import references
from mirror.config import Config, ConfigError
from mirror.metadata.fallback import FallbackMetadata
from mirror.oci.errors import RegistryError
from mirror.oci.negotiation import MANIFEST_TYPES
from mirror.oci.reference import parse_digest, validate_name, validate_tag
from mirror.storage import CacheStore
from mirror.storage.base import NotTidied, VerifyResult
from mirror.upstream.client import Upstream
from mirror.util.units import human_size
from mirror.web.offline import Services, with_services

PARALLEL_BLOBS = 4
# `--platform`: os/architecture[/variant], as an index's entries spell them (lower case).
PLATFORM = re.compile(r"[a-z0-9._-]+/[a-z0-9._-]+(/[a-z0-9._-]+)?")
# `mirror ls`'s size of an image whose cached manifest does not parse.
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ImageRef:
    """`[registry/]repository[:tag][@digest]`, as `docker pull` takes it."""

    registry: str | None
    repository: str
    reference: str

    def __str__(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        prefix = f"{self.registry}/" if self.registry else ""
        return f"{prefix}{self.repository}{sep}{self.reference}"


def parse_image(text: str) -> ImageRef:
    """Parse an image reference; Docker Hub's single names get `library/`."""
    name, _, digest = text.strip().partition("@")
    tag = "latest"
    last_slash = name.rfind("/")
    if name.rfind(":") > last_slash:
        name, _, tag = name.rpartition(":")
    first, sep, rest = name.partition("/")
    registry = None
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, rest
    if registry in (None, "docker.io", "index.docker.io") and "/" not in name:
        name = f"library/{name}"
    validate_name(name)
    if "@" in text:
        parse_digest(digest)  # an empty digest is invalid too
        return ImageRef(registry, name, digest)
    return ImageRef(registry, name, validate_tag(tag))


def check_platform(platform: str) -> str:
    """`--platform` checked before anything is fetched: a value that matches no index entry
    would otherwise warm nothing of every image and report success."""
    if not PLATFORM.fullmatch(platform):
        raise ConfigError("--platform", f"expected os/arch[/variant], got {platform!r}")
    return platform


class NoPlatform(Exception):
    """An index has no image of the platform asked for."""


@dataclass
class WarmReport:
    images: int = 0
    manifests: int = 0
    fetched: int = 0
    cached: int = 0
    bytes_fetched: int = 0
    failures: list[str] = field(default_factory=list)


class Warmer:
    """Pulls images into the cache: manifests (every platform, or one) and blobs."""

    def __init__(self, services: Services, platform: str | None, out: TextIO) -> None:
        self._services = services
        self._platform = platform
        self._out = out
        self._limit = asyncio.Semaphore(PARALLEL_BLOBS)
        self.report = WarmReport()

    async def warm(self, image: ImageRef) -> None:
        try:
            upstream, repo = self._services.upstreams.route(image.repository, image.registry)
            await self._manifest(upstream, repo, image.reference)
            self.report.images += 1
            self._say(f"{image}: done")
        except RegistryError as exc:
            self._fail(image, exc.message)
        except NoPlatform:
            self._fail(image, f"no {self._platform} image in its index")

    def _fail(self, image: ImageRef, reason: str) -> None:
        self.report.failures.append(f"{image}: {reason}")
        self._say(f"{image}: FAILED: {reason}")

    async def _manifest(self, upstream: Upstream, repo: str, reference: str) -> None:
        found = await self._services.manifests.get(
            upstream, repo, reference, MANIFEST_TYPES, head=False
        )
        self.report.manifests += 1
        # Served under this repository from now on, though cached already: it holds them.
        await self._services.holdings.record(
            upstream.name, repo, [found.digest, *references(found.body or b"", found.media_type)]
        )
        doc: dict[str, Any] = json.loads(found.body or b"{}")
        if "manifests" in doc:
            children = [m["digest"] for m in doc["manifests"] if self._wanted(m)]
            if not children and self._platform is not None:
                raise NoPlatform
            await asyncio.gather(*(self._manifest(upstream, repo, d) for d in children))
            return
        blobs = [doc.get("config", {}), *doc.get("layers", [])]
        await asyncio.gather(
            *(self._blob(upstream, repo, b["digest"], b.get("size", 0)) for b in blobs if b)
        )

    def _wanted(self, entry: dict[str, Any]) -> bool:
        platform = entry.get("platform") or {}
        if platform.get("os") == "unknown":  # attestation manifests: not an image
            return self._platform is None
        if self._platform is None:
            return True
        wanted = self._platform.split("/")
        actual = [platform.get("os", ""), platform.get("architecture", "")]
        if len(wanted) > 2:
            actual.append(platform.get("variant", ""))
        return actual == wanted

    async def _blob(self, upstream: Upstream, repo: str, digest: str, size: int) -> None:
        storage: CacheStore = self._services.storage
        parsed = parse_digest(digest)
        if await storage.contains(parsed):
            self.report.cached += 1
            return
        async with self._limit:
            download = self._services.downloads.start_or_join(upstream, repo, parsed)
            try:
                await download.started()
                await self._follow(download, size)
            except Uncacheable as exc:
                self._say(f"  {digest[:19]}: not cached ({exc.message})")
                return
        self.report.fetched += 1
        self.report.bytes_fetched += download.written

    async def _follow(self, download: Download, size: int) -> None:
        """Wait for the download, drawing a progress bar on a terminal."""
        waiting = asyncio.ensure_future(download.finished())
        while not waiting.done():
            await asyncio.wait([waiting], timeout=0.5)
            if self._out.isatty():
                self._out.write("\r" + progress_bar(str(download.digest), download.written, size))
                self._out.flush()
        waiting.result()
        self._say(progress_bar(str(download.digest), download.written, size), newline=True)

    def _say(self, line: str, newline: bool = True) -> None:
        prefix = "\r" if self._out.isatty() else ""
        self._out.write(prefix + line + ("\n" if newline else ""))
        self._out.flush()


def progress_bar(digest: str, done: int, total: int, width: int = 30) -> str:
    fraction = min(1.0, done / total) if total else 1.0
    filled = int(width * fraction)
    return (
        f"  {digest[:19]} [{'#' * filled}{'.' * (width - filled)}] "
        f"{human_size(done)}/{human_size(total)}"
    )


async def warm(
    config: Config, images: list[str], platform: str | None, out: TextIO = sys.stdout
) -> WarmReport:
    refs = [parse_image(image) for image in images]
    started = time.monotonic()

    async def run(services: Services) -> WarmReport:
        warmer = Warmer(services, platform, out)
        for ref in refs:
            await warmer.warm(ref)
        return warmer.report

    report = await with_services(config, run)
    out.write(
        f"warmed {report.images}/{len(refs)} images: {report.manifests} manifests, "
        f"{report.fetched + report.cached} blobs ({report.fetched} fetched, "
        f"{report.cached} already cached), {human_size(report.bytes_fetched)} fetched "
        f"in {time.monotonic() - started:.1f}s\n"
    )
    return report


async def list_cache(config: Config, out: TextIO = sys.stdout) -> int:
    """Print cached tags with their digests and sizes; returns how many."""

    async def run(services: Services) -> list[tuple[str, str, str, int | None]]:
        storage: CacheStore = services.storage
        sizes = await storage.blob_sizes()
        rows = []
        tags = await services.metadata.tags()
        if isinstance(services.metadata, FallbackMetadata) and not services.metadata.up:
            # Its in-process stand-in holds nothing: "0 tags" would read as an empty cache.
            raise MetadataUnreachable("the metadata store does not answer: no tags listed")
        for upstream, repo, tag, record in sorted(tags):
            if "+" in tag:  # a kept referrers answer (referrers.py), not a tag
                continue
            size = await image_size(storage, record.digest, sizes)
            rows.append((f"{upstream}/{repo}", tag, record.digest, size))
        return rows

    rows = await with_services(config, run)
    out.write(f"{'REPOSITORY':<45} {'TAG':<20} {'DIGEST':<19} SIZE\n")
    for repo, tag, digest, size in rows:
        shown = UNREADABLE if size is None else human_size(size)
        out.write(f"{repo:<45} {tag:<20} {digest[:19]:<19} {shown}\n")
    total = sum(size or 0 for *_, size in rows)
    out.write(f"{len(rows)} tags; blobs on disk referenced by them: {human_size(total)}\n")
    return len(rows)


class MetadataUnreachable(Exception):
    """`ls` found the metadata store down: what it would list is not known."""


async def image_size(storage: CacheStore, digest: str, sizes: dict[str, int]) -> int | None:
    """Bytes of the cached blobs an image (or every image of an index) refers to; None when
    a cached manifest among them is no manifest (`mirror verify` removes a corrupt one)."""
    cached = await storage.read_manifest(parse_digest(digest))
    if cached is None:
        return 0
    try:
        doc = json.loads(cached[1])
        if "manifests" in doc:
            children = [str(m["digest"]) for m in doc["manifests"]]
            found = [await image_size(storage, child, sizes) for child in children]
            return None if None in found else sum(size or 0 for size in found)
        blobs = [doc.get("config", {}), *doc.get("layers", [])]
        return sum(sizes.get(blob.get("digest", ""), 0) for blob in blobs)
    except (ValueError, TypeError, KeyError, AttributeError, RegistryError):
        return None


async def collect_garbage(config: Config, to: int | None, out: TextIO = sys.stdout) -> int:
    """Evict down to `to` bytes (or the configured bounds) now; returns bytes freed."""

    async def run(services: Services) -> int:
        result = await services.evictor.evict(max_size=to)
        out.write(
            f"evicted {result.evicted} blobs, {human_size(result.freed)} freed, "
            f"{human_size(result.remaining)} of blobs left\n"
        )
        try:
            lines = await services.storage.collect_garbage(to)
        except NotTidied as exc:
            out.write(f"bucket: not evicted: {exc}\n")
            raise
        for line in lines:
            out.write(line + "\n")
        return result.freed

    return await with_services(config, run)


async def verify(config: Config, out: TextIO = sys.stdout) -> VerifyResult:
    """Re-hash the cache; what could not be verified (the bucket failed) is said last."""
    result = await with_services(config, lambda services: services.storage.verify())
    for digest in result.removed:
        out.write(f"removed corrupt {digest}\n")
    out.write(f"verified {result.checked} files, removed {len(result.removed)} corrupt\n")
    if result.unverified is not None:
        out.write(result.unverified + "\n")
    return result
