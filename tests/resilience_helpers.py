"""Helpers shared by the process-level resilience tests and the soak run.

Nothing here imports `mirror`: like the fake hub, these helpers look at the mirror from the
outside (HTTP, its log file, its storage directory, /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.images import DOCKER_LAYER, Blob, Layer, push_image, single_image

MIB = 1024 * 1024

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class RandomImage:
    """A single-layer image whose layer is `size` random bytes, pushed as `repo:tag`."""

    repo: str
    tag: str
    manifest_digest: str
    layer_digest: str
    data: bytes

    @property
    def blob_path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.layer_digest}"


def seed_random_image(registry_url: str, name: str, size: int, seed: int) -> RandomImage:
    """Push `library/<name>:latest` whose only layer is `size` random bytes."""
    data = random_bytes(size, seed)
    blob = Blob.of(DOCKER_LAYER, data)
    # Not a tar: nobody unpacks it, and registries do not look inside.
    image = single_image(name, [Layer(blob, diff_id=blob.digest)])
    repo = f"library/{name}"
    push_image(registry_url.rstrip("/"), repo, "latest", image)
    return RandomImage(repo, "latest", image.manifest.digest, blob.digest, data)


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """The mirror's YAML config file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def cached_blob_path(storage: Path, digest: str) -> Path:
    """Where the mirror keeps a committed blob: blobs/<alg>/<2 hex>/<hex>."""
    algorithm, _, hexdigest = digest.partition(":")
    return storage / "blobs" / algorithm / hexdigest[:2] / hexdigest


async def wait_for_file(path: Path, seconds: float = 5.0) -> bool:
    """True once `path` exists: a client gets a blob's last byte when its hash matched,
    and the fsync and rename into the cache follow a moment later."""
    for _ in range(int(seconds / 0.02)):
        if path.exists():
            return True
        await asyncio.sleep(0.02)
    return path.exists()


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text output, None when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if labels is None or all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def log_since_last_start(path: Path) -> str:
    """The part of a service log written since its last start (services.py marks each)."""
    text = path.read_text(errors="replace")
    marker = text.rfind("--- start:")
    return text[marker:] if marker >= 0 else text


def count_lines(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if needle in line)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def connect_refused(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP connect to host:port is actively refused (nobody listens)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# --- mounts (root only) ------------------------------------------------------------------


class MountError(RuntimeError):
    """mount(8) refused: not root, or no CAP_SYS_ADMIN in this container."""


def _run_mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MountError(f"mount {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if os.path.ismount(path):  # busy: detach it anyway, the test is over
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    _run_mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` bind-mounted read-only onto itself for the duration."""
    _run_mount("--bind", str(path), str(path))
    try:
        _run_mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        umount(path)


def fill_filesystem(path: Path) -> int:
    """Write into `path` until the filesystem is full; the bytes written."""
    written = 0
    block = b"\0" * 65536
    with path.open("wb", buffering=0) as out:
        for size in (65536, 4096, 1):
            piece = block[:size]
            while True:
                try:
                    written += out.write(piece) or 0
                except OSError:
                    break
    return written


# --- pulling the way Docker does ---------------------------------------------------------


@dataclass
class Puller:
    """Pulls images through a registry URL like Docker does, checking every digest.

    Every request is counted and timed; any non-2xx answer, broken transfer or digest
    mismatch is recorded in `errors` (the pull goes on where it can).
    """

    session: Any  # aiohttp.ClientSession
    base: str
    arch: str = "amd64"
    requests: int = 0
    pulls: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def _error(self, what: str) -> None:
        self.errors.append(what)

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        *,
        expect_digest: str | None = None,
        keep_body: bool = True,
    ) -> tuple[int, Mapping[str, str], bytes | None]:
        """One request; returns (status, headers, body) with status 0 on a broken transfer.

        With `expect_digest`, the body's sha256 must match it; with keep_body False the
        body is hashed as it streams and not kept.
        """
        import aiohttp  # here: the helpers above must not need it

        self.requests += 1
        started = time.monotonic()
        hasher = hashlib.sha256()
        body = bytearray()
        try:
            async with self.session.request(method, self.base + path, headers=headers) as resp:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    hasher.update(chunk)
                    if keep_body:
                        body += chunk
                status, resp_headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.latencies.append(time.monotonic() - started)
            self._error(f"{method} {path}: broken transfer: {type(exc).__name__}: {exc}")
            return 0, {}, None
        self.latencies.append(time.monotonic() - started)
        if not 200 <= status < 300:
            self._error(f"{method} {path}: HTTP {status}: {bytes(body[:300])!r}")
        elif expect_digest is not None and method == "GET":
            got = "sha256:" + hasher.hexdigest()
            if got != expect_digest:
                self._error(f"{method} {path}: body hashes to {got}, not {expect_digest}")
        return status, resp_headers, bytes(body) if keep_body else None

    async def pull(self, repo: str, tag: str) -> bool:
        """GET /v2/, HEAD the tag, GET the manifest by digest (the platform's child of an
        index), GET every blob. True when every step answered 2xx with the right bytes."""
        errors_before = len(self.errors)
        await self.request("GET", "/v2/")
        accept = {"Accept": MANIFEST_ACCEPT}
        status, headers, _ = await self.request("HEAD", f"/v2/{repo}/manifests/{tag}", accept)
        digest = headers.get("Docker-Content-Digest", "")
        if status != 200 or not digest:
            if status == 200:
                self._error(f"HEAD {repo}:{tag}: no Docker-Content-Digest")
            return False
        manifest = await self._manifest(repo, digest)
        if manifest is not None and manifest.get("mediaType") in INDEX_TYPES:
            child = next(
                (
                    m["digest"]
                    for m in manifest.get("manifests", [])
                    if m.get("platform", {}).get("architecture") == self.arch
                ),
                None,
            )
            if child is None:
                self._error(f"{repo}:{tag}: index has no {self.arch} manifest")
                return False
            manifest = await self._manifest(repo, child)
        if manifest is None:
            return False
        blobs = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
        for blob in blobs:
            await self.request(
                "GET", f"/v2/{repo}/blobs/{blob}", expect_digest=blob, keep_body=False
            )
        ok = len(self.errors) == errors_before
        if ok:
            self.pulls += 1
        return ok

    async def _manifest(self, repo: str, digest: str) -> dict[str, Any] | None:
        status, _, body = await self.request(
            "GET", f"/v2/{repo}/manifests/{digest}", {"Accept": MANIFEST_ACCEPT},
            expect_digest=digest,
        )  # fmt: skip
        if status != 200 or body is None or sha256_digest(body) != digest:
            return None
        try:
            result: dict[str, Any] = json.loads(body)
        except ValueError:
            self._error(f"GET {repo}@{digest}: not JSON")
            return None
        return result


async def temp_files_settled(storage: Path) -> list[str]:
    """The temp files left once a failed download has cleaned up: its readers are told of
    the failure first, and the temp file is removed just after."""
    tmp = storage / "tmp"
    for _ in range(100):
        if not os.listdir(tmp):
            break
        await asyncio.sleep(0.02)
    return os.listdir(tmp)
