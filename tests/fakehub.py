"""A fake Docker Hub: registry-1.docker.io, auth.docker.io and the blob CDN, on three real ports.

Three hosts rather than one app so that the mirror under test must follow the token realm and
the 307 to the CDN across hosts exactly as it does against the real Hub. Content comes from an
in-memory `Content` store, or from a real auth-less registry given as `backend`. Nothing is
imported from `mirror` on purpose: the fake must not share the mirror's bugs.

Standalone: python -m tests.fakehub --backend http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import BasicAuth, ClientResponse, ClientSession, web
from aiohttp.typedefs import Handler, Middleware

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"

SERVICE = "registry.docker.io"
CHUNK = 64 * 1024
RATELIMIT_LIMIT = 100
RATELIMIT_WINDOW = 21600
# Translation table that changes every byte but keeps the length: a corrupt blob must only be
# detectable by its digest, not by its size.
INVERT = bytes(255 - i for i in range(256))
MANIFEST_HEADERS = ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag")
STAT_KEYS = (
    "token", "token_basic", "v2", "manifest_get", "manifest_head", "blob_get", "blob_head",
    "cdn_get", "cdn_head", "cdn_rejected_auth", "tags_list", "referrers", "unauthorized",
)  # fmt: skip
KNOBS = (
    "token_expires_in", "corrupt_blobs", "ratelimit_remaining", "cdn_delay", "users",
    "cdn_cut_after", "registry_status", "manifests_status", "cdn_ignores_range", "token_delay",
    "referrers_api", "referrers_filter", "referrers_page_size",
    "manifest_delay", "tags_page_size", "scoped_blobs", "lookup_delay", "blob_delay",
    "manifest_head_length",
)  # fmt: skip


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


def parse_accept(request: web.Request) -> list[str]:
    """Media types from every Accept line: Go clients send one line per type."""
    types = []
    for line in request.headers.getall("Accept", []):
        for item in line.split(","):
            media_type = item.split(";", 1)[0].strip()
            if media_type:
                types.append(media_type)
    return types


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one byte range, None to serve the whole blob."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None  # absent, another unit or multi-range: RFC 9110 lets a server ignore it
    first_s, _, last_s = header[len("bytes=") :].strip().partition("-")
    try:
        if first_s:  # bytes=a-b or bytes=a-
            first, last = int(first_s), int(last_s) if last_s else size - 1
            if last_s and last < first:
                return None  # syntactically invalid: ignored, not unsatisfiable
            last = min(last, size - 1)
        else:  # bytes=-n: the last n bytes; bytes=-0 asks for none, so is unsatisfiable
            n = int(last_s)
            first, last = (max(size - n, 0) if n else size), size - 1
    except ValueError:
        return None
    if first >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return first, last


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "size": len(data), "digest": digest_of(data)}


class Content:
    """In-memory images. Blobs are shared by all repositories; manifests and tags are not."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.blob_repos: dict[str, set[str]] = {}  # digest → repositories it was pushed to
        self.manifests: dict[str, dict[str, tuple[str, bytes]]] = {}  # repo→digest→(type, body)
        self.tags: dict[str, dict[str, str]] = {}  # repo → tag → digest
        self.referrers: dict[str, bytes] = {}  # subject digest → OCI index body

    def add_blob(self, data: bytes, repo: str | None = None) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        if repo is not None:
            self.blob_repos.setdefault(digest, set()).add(repo)
        return digest

    def holds_blob(self, repo: str, digest: str) -> bool:
        """A blob is in a repository it was pushed to (one pushed to none: in every one)."""
        return digest in self.blobs and repo in self.blob_repos.get(digest, {repo})

    def add_manifest(self, repo: str, body: bytes, media_type: str, tag: str | None = None) -> str:
        digest = digest_of(body)
        self.manifests.setdefault(repo, {})[digest] = (media_type, body)
        self.tags.setdefault(repo, {})
        if tag is not None:
            self.set_tag(repo, tag, digest)
        return digest

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        if digest not in self.manifests.get(repo, {}):
            raise KeyError(f"{digest} is not a manifest of {repo}")
        self.tags.setdefault(repo, {})[tag] = digest

    def set_referrers(self, subject: str, index_body: bytes) -> None:
        self.referrers[subject] = index_body

    def referrers_index(self, repo: str, subject: str) -> dict[str, Any]:
        """The referrers API's answer: a set index, else every manifest of repo whose
        `subject` is the digest, described as the spec says."""
        if subject in self.referrers:
            index: dict[str, Any] = json.loads(self.referrers[subject])
            return index
        entries = []
        for digest, (media_type, body) in sorted(self.manifests.get(repo, {}).items()):
            doc = json.loads(body)
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            artifact_type = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            entry = {"mediaType": media_type, "digest": digest, "size": len(body),
                     "artifactType": artifact_type}  # fmt: skip
            if doc.get("annotations"):
                entry["annotations"] = doc["annotations"]
            entries.append(entry)
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}

    def add_artifact(
        self, repo: str, subject: str, artifact_type: str, payload: bytes, tag: str | None = None
    ) -> str:
        """A signature or SBOM as signing tools push it: an OCI manifest with artifactType,
        the empty config, one layer and the subject it refers to."""
        subject_type, subject_body = self.manifests[repo][subject]
        empty = self.add_blob(b"{}")
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_CONFIG, "digest": empty, "size": 2},
            "layers": [descriptor(artifact_type, payload)],
            "subject": {"mediaType": subject_type, "digest": subject, "size": len(subject_body)},
        }
        self.add_blob(payload)
        return self.add_manifest(repo, json.dumps(manifest).encode(), OCI_MANIFEST, tag)

    def add_image(
        self, repo: str, tag: str | None, layers: list[bytes], media_type: str = DOCKER_MANIFEST
    ) -> dict[str, Any]:
        """Config + layers + schema2/OCI manifest. Returns digests and the manifest body."""
        oci = media_type == OCI_MANIFEST
        layer_digests = [self.add_blob(layer, repo) for layer in layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": layer_digests},
            }
        ).encode()
        config_digest = self.add_blob(config, repo)
        layer_type = OCI_LAYER if oci else DOCKER_LAYER
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(OCI_CONFIG if oci else DOCKER_CONFIG, config),
            "layers": [descriptor(layer_type, layer) for layer in layers],
        }
        body = json.dumps(manifest, indent=3).encode()
        digest = self.add_manifest(repo, body, media_type, tag)
        return {
            "digest": digest,
            "manifest": body,
            "config": config_digest,
            "layers": layer_digests,
        }

    def add_index(
        self, repo: str, tag: str | None, manifests: list[tuple[str, str, int, dict[str, str]]]
    ) -> str:
        entries = [
            {"mediaType": mt, "digest": digest, "size": size, "platform": platform}
            for digest, mt, size, platform in manifests
        ]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        return self.add_manifest(repo, body.encode(), OCI_INDEX, tag)

    def resolve(self, repo: str, ref: str) -> tuple[str, str, bytes] | None:
        """(digest, media type, body) for a tag or digest of repo."""
        manifests = self.manifests.get(repo, {})
        digest = ref if ":" in ref else self.tags.get(repo, {}).get(ref)  # tags have no ':'
        if digest is None or digest not in manifests:
            return None
        media_type, body = manifests[digest]
        return digest, media_type, body


class Stats(Counter[str]):
    """Request counters, plus the details tests want to assert on."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(STAT_KEYS, 0))
        self.requests: list[tuple[str, str, str]] = []  # (app, method, path_qs)
        self.accept_seen: list[list[str]] = []  # Accept types of each manifest request
        self.cdn_get_by_digest: Counter[str] = Counter()
        self.token_users: list[str] = []  # usernames sent with Basic auth, never passwords

    def reset(self) -> None:
        """Zero everything in place: tests may hold references to the lists."""
        for key in self:
            self[key] = 0  # not update(): on a Counter that adds
        for details in (self.requests, self.accept_seen, self.cdn_get_by_digest, self.token_users):
            details.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            **self,
            "requests": self.requests,
            "accept_seen": self.accept_seen,
            "cdn_get_by_digest": dict(self.cdn_get_by_digest),
            "token_users": self.token_users,
        }


@dataclass(frozen=True)
class Token:
    expires: float  # time.monotonic()
    repos: frozenset[str]  # repositories granted pull


class FakeHub:
    def __init__(self, content: Content | None = None, backend: str | None = None) -> None:
        self.content = content if content is not None else Content()
        self.backend = backend.rstrip("/") if backend else None
        self.stats = Stats()
        # Knobs: plain attributes, also settable with POST /_knobs.
        self.token_expires_in = 300
        self.corrupt_blobs: set[str] = set()
        self.ratelimit_remaining = RATELIMIT_LIMIT
        self.cdn_delay = 0.0  # seconds slept before each CDN chunk
        self.users: dict[str, str] = {}  # empty: any Basic credentials are accepted
        self.cdn_cut_after: int | None = None  # drop CDN connections after this many bytes
        self.registry_status: int | None = None  # answer every /v2 request with this status
        self.manifests_status: int | None = None  # the manifests alone answer this status
        self.cdn_ignores_range = False  # a CDN that always answers 200 with the whole blob
        self.token_delay = 0.0  # seconds the token service takes to answer
        self.referrers_api = True  # False: 404 like Docker Hub (memory mode; a backend decides)
        self.referrers_filter = True  # False: an API that ignores artifactType
        self.referrers_page_size: int | None = None  # page the API's answers
        self.manifest_delay = 0.0  # seconds each manifest GET or HEAD takes (or fails)
        # False: a manifest HEAD names no Content-Length (chunked, as some registries answer).
        self.manifest_head_length = True
        self.lookup_delay = 0.0  # seconds each tag list, referrers or blob HEAD request takes
        self.blob_delay = 0.0  # seconds each blob GET waits before its answer (a hung upstream)
        # Page tag lists (with Link) at most this long, even asked without n (a backend's
        # list too: docker-registry 2.8 ignores n and last, and answers unsorted).
        self.tags_page_size: int | None = None
        # True: a blob is found only in the repositories it was pushed to, as on Docker
        # Hub; False: in every repository (the content store is shared).
        self.scoped_blobs = False
        self.registry_url = self.token_url = self.cdn_url = ""
        self._tokens: dict[str, Token] = {}
        self._runners: list[web.AppRunner] = []
        self._session: ClientSession | None = None

    async def start(self, registry_port: int = 0, token_port: int = 0, cdn_port: int = 0) -> None:
        if self.backend:
            # Blobs must reach the client byte for byte, so no transparent gunzip.
            self._session = ClientSession(auto_decompress=False)
        self.registry_url = await self._serve(self._registry_app(), registry_port)
        self.token_url = await self._serve(self._token_app(), token_port)
        self.cdn_url = await self._serve(self._cdn_app(), cdn_port)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session:
            await self._session.close()

    async def __aenter__(self) -> FakeHub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reset_stats(self) -> None:
        self.stats.reset()

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (revoked, or its key rotated)."""
        self._tokens.clear()

    def knobs(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in KNOBS}
        values["corrupt_blobs"] = sorted(self.corrupt_blobs)
        return values

    async def _serve(self, app: web.Application, port: int) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        host, bound = runner.addresses[-1][:2]
        return f"http://{host}:{bound}"

    def _recorder(self, app_name: str) -> Middleware:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith("/_"):  # test-only endpoints are not traffic
                self.stats.requests.append((app_name, request.method, request.path_qs))
            return await handler(request)

        return record

    # --- registry-1.docker.io -------------------------------------------------------------

    def _registry_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("registry"), self._auth])
        app.router.add_get("/v2/", self._v2)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob_redirect)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags_list, allow_head=False)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers, allow_head=False)
        app.router.add_get("/_stats", self._get_stats)
        app.router.add_post("/_reset", self._reset)
        app.router.add_get("/_knobs", self._get_knobs)
        app.router.add_post("/_knobs", self._set_knobs)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2/"):
            return await handler(request)
        # An outage: nothing works, not even /v2/; or the manifests alone fail.
        partial = self.manifests_status is not None and "/manifests/" in request.path
        if self.registry_status is not None or partial:
            status = self.registry_status or self.manifests_status or 503
            if self.manifest_delay and "/manifests/" in request.path:
                await asyncio.sleep(self.manifest_delay)  # a slow failure
            code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
            return oci_error(status, code, "knob", {"Retry-After": "60"})
        name = request.match_info.get("name")
        if not self._authorized(request, name):
            self.stats["unauthorized"] += 1
            scope = f',scope="repository:{name}:pull"' if name else ""
            challenge = f'Bearer realm="{self.token_url}/token",service="{SERVICE}"{scope}'
            return oci_error(401, "UNAUTHORIZED", "authentication required",
                             {"WWW-Authenticate": challenge})  # fmt: skip
        response = await handler(request)
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        return response

    def _authorized(self, request: web.Request, name: str | None) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None or token.expires <= time.monotonic():
            return False
        return name is None or name in token.repos

    async def _v2(self, request: web.Request) -> web.Response:
        self.stats["v2"] += 1
        return web.json_response({})

    def _ratelimit_headers(self) -> dict[str, str]:
        return {
            "ratelimit-limit": f"{RATELIMIT_LIMIT};w={RATELIMIT_WINDOW}",
            "ratelimit-remaining": f"{max(self.ratelimit_remaining, 0)};w={RATELIMIT_WINDOW}",
            "docker-ratelimit-source": "127.0.0.1",
        }

    async def _manifest(self, request: web.Request) -> web.Response:
        name, ref = request.match_info["name"], request.match_info["ref"]
        is_get = request.method == "GET"
        self.stats["manifest_get" if is_get else "manifest_head"] += 1
        accepts = parse_accept(request)
        self.stats.accept_seen.append(accepts)
        if self.manifest_delay:  # a slow upstream: concurrent misses overlap for sure
            await asyncio.sleep(self.manifest_delay)
        if is_get:  # every GET spends a pull, whatever it finds; a HEAD is free
            if self.ratelimit_remaining <= 0:
                headers = {**self._ratelimit_headers(), "Retry-After": "60"}
                return oci_error(429, "TOOMANYREQUESTS", "pull rate limit exceeded", headers)
            self.ratelimit_remaining -= 1
        if self._session:
            response = await self._backend_manifest(request, name, ref, accepts)
        else:
            response = self._memory_manifest(name, ref, accepts, is_get)
        response.headers.update(self._ratelimit_headers())
        return response

    def _memory_manifest(
        self, name: str, ref: str, accepts: list[str], is_get: bool
    ) -> web.Response:
        found = self.content.resolve(name, ref)
        accepted = not accepts or "*/*" in accepts or (found is not None and found[1] in accepts)
        if found is None or not accepted:  # the reference registry: wrong type is unknown
            return oci_error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {name}:{ref}")
        digest, media_type, body = found
        headers = {
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
        }
        if is_get:
            return web.Response(headers=headers, body=body)
        response = web.Response(headers=headers)
        if not self.manifest_head_length:
            del response.headers["Content-Length"]
            response.enable_chunked_encoding()
        return response

    async def _backend_manifest(
        self, request: web.Request, name: str, ref: str, accepts: list[str]
    ) -> web.Response:
        assert self._session is not None
        headers = {"Accept": ", ".join(accepts)} if accepts else {}
        url = f"{self.backend}/v2/{name}/manifests/{ref}"
        async with self._session.request(request.method, url, headers=headers) as resp:
            return await relay(resp, MANIFEST_HEADERS)

    async def _blob_redirect(self, request: web.Request) -> web.Response:
        name, digest = request.match_info["name"], request.match_info["digest"]
        self.stats["blob_get" if request.method == "GET" else "blob_head"] += 1
        if request.method == "HEAD" and self.lookup_delay:
            await asyncio.sleep(self.lookup_delay)
        if request.method == "GET" and self.blob_delay:
            await asyncio.sleep(self.blob_delay)
        if not await self._blob_exists(name, digest):
            return oci_error(404, "BLOB_UNKNOWN", f"blob unknown: {digest}")
        # A fresh signature each time, like the real CDN URLs: a mirror must not cache them.
        query = urlencode({"repo": name, "sig": secrets.token_hex(16)})
        return web.Response(
            status=307, headers={"Location": f"{self.cdn_url}/blobs/{digest}?{query}"}
        )

    async def _blob_exists(self, name: str, digest: str) -> bool:
        if self._session is None:
            if self.scoped_blobs:
                return self.content.holds_blob(name, digest)
            return digest in self.content.blobs
        async with self._session.head(f"{self.backend}/v2/{name}/blobs/{digest}") as resp:
            return resp.status == 200

    async def _tags_list(self, request: web.Request) -> web.Response:
        self.stats["tags_list"] += 1
        if self.lookup_delay:  # a slow upstream: concurrent requests overlap for sure
            await asyncio.sleep(self.lookup_delay)
        name = request.match_info["name"]
        if self._session:
            url = f"{self.backend}/v2/{name}/tags/list"
            async with self._session.get(url, params=request.query) as resp:
                if resp.status != 200 or not self.tags_page_size:
                    return await relay(resp, ("Content-Type", "Link"))
                tags = (await resp.json()).get("tags") or []
        elif name not in self.content.tags:
            return oci_error(404, "NAME_UNKNOWN", f"repository name not known: {name}")
        else:
            tags = list(self.content.tags[name])
        return self._tags_page(request, name, tags)

    def _tags_page(self, request: web.Request, name: str, tags: list[str]) -> web.Response:
        """One page as a registry that pages does it: sorted, after `last`, with a Link."""
        tags = sorted(tags)
        if last := request.query.get("last"):
            tags = [tag for tag in tags if tag > last]
        n = request.query.get("n", "")
        sizes = (int(n) if n.isdigit() else None, self.tags_page_size)
        size = min((size for size in sizes if size is not None), default=None)
        headers = {}
        if size is not None and len(tags) > size:
            tags = tags[:size]
            if tags:
                query = urlencode({"last": tags[-1], "n": size})
                headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        self.stats["referrers"] += 1
        if self.lookup_delay:
            await asyncio.sleep(self.lookup_delay)
        name, digest = request.match_info["name"], request.match_info["digest"]
        if self._session:  # the backend's answer: distribution 2.8 has no referrers API
            url = f"{self.backend}/v2/{name}/referrers/{digest}"
            async with self._session.get(url, params=request.query) as resp:
                return await relay(resp, ("Content-Type", "OCI-Filters-Applied"))
        if not self.referrers_api:  # like Docker Hub today: clients fall back to the tag scheme
            return oci_error(404, "NOT_FOUND", "referrers API not supported")
        if name not in self.content.manifests:
            return oci_error(404, "NAME_UNKNOWN", f"repository name not known: {name}")
        index = self.content.referrers_index(name, digest)
        headers = {}
        artifact_type = request.query.get("artifactType")
        if artifact_type and self.referrers_filter:
            index["manifests"] = [
                m for m in index["manifests"] if m.get("artifactType") == artifact_type
            ]
            headers["OCI-Filters-Applied"] = "artifactType"
        if self.referrers_page_size:  # pages, with an opaque next link as registries do
            start = int(request.query.get("page", "0"))
            end = start + self.referrers_page_size
            if end < len(index["manifests"]):
                query = urlencode({**request.query, "page": end})
                headers["Link"] = f'</v2/{name}/referrers/{digest}?{query}>; rel="next"'
            index["manifests"] = index["manifests"][start:end]
        return web.Response(body=json.dumps(index).encode(), content_type=OCI_INDEX,
                            headers=headers)  # fmt: skip

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response({})

    async def _get_knobs(self, request: web.Request) -> web.Response:
        return web.json_response(self.knobs())

    async def _set_knobs(self, request: web.Request) -> web.Response:
        body = await request.json()
        unknown = sorted(set(body) - set(KNOBS))
        if unknown:
            return web.json_response({"unknown knobs": unknown}, status=400)
        for name, value in body.items():
            setattr(self, name, set(value) if name == "corrupt_blobs" else value)
        return web.json_response(self.knobs())

    # --- auth.docker.io ---------------------------------------------------------------------

    def _token_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("token")])
        app.router.add_get("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.stats["token"] += 1
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if header := request.headers.get("Authorization"):
            try:
                creds = BasicAuth.decode(header)
            except ValueError:
                return web.json_response({"details": "malformed credentials"}, status=401)
            self.stats["token_basic"] += 1
            self.stats.token_users.append(creds.login)
            if self.users and self.users.get(creds.login) != creds.password:
                return web.json_response({"details": "incorrect username or password"}, status=401)
        repos = set()
        for param in request.query.getall("scope", []):
            for scope in param.split():  # some clients put several scopes in one parameter
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and "pull" in actions.split(","):
                    repos.add(name)  # only pull is ever granted, as to a Hub pull client
        token = secrets.token_urlsafe(32)
        self._tokens[token] = Token(time.monotonic() + self.token_expires_in, frozenset(repos))
        issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {"token": token, "access_token": token, "expires_in": self.token_expires_in,
                "issued_at": issued_at}  # fmt: skip
        return web.json_response(body)

    # --- the blob CDN -----------------------------------------------------------------------

    def _cdn_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("cdn")])
        app.router.add_get("/blobs/{digest}", self._cdn_blob)
        return app

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if request.method == "GET":
            self.stats["cdn_get"] += 1
            self.stats.cdn_get_by_digest[digest] += 1
        else:
            self.stats["cdn_head"] += 1
        if "Authorization" in request.headers:  # the real CDN rejects a forwarded token
            self.stats["cdn_rejected_auth"] += 1
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if self._session:
            return await self._backend_cdn(request, digest)
        data = self.content.blobs.get(digest)
        if data is None:
            return web.Response(status=404, text="NoSuchKey")
        span = (
            None if self.cdn_ignores_range else parse_range(request.headers.get("Range"), len(data))
        )
        first, last = span or (0, len(data) - 1)
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"} if span else {}
        view = memoryview(data)[first : last + 1]

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(view), CHUNK):
                yield bytes(view[offset : offset + CHUNK])

        return await self._stream(request, 206 if span else 200, len(view), headers, chunks())

    async def _backend_cdn(self, request: web.Request, digest: str) -> web.StreamResponse:
        assert self._session is not None
        url = f"{self.backend}/v2/{request.query.get('repo', '')}/blobs/{digest}"
        headers = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
        async with self._session.request(request.method, url, headers=headers) as resp:
            if resp.status not in (200, 206):
                return await relay(resp, ("Content-Type", "Content-Range"))
            extra = {"Content-Range": resp.headers["Content-Range"]} if resp.status == 206 else {}
            chunks = resp.content.iter_chunked(CHUNK)
            return await self._stream(request, resp.status, resp.content_length, extra, chunks)

    async def _stream(
        self,
        request: web.Request,
        status: int,
        length: int | None,
        headers: dict[str, str],
        chunks: AsyncIterator[bytes],
    ) -> web.StreamResponse:
        """Write the body chunk by chunk, so knobs can slow, corrupt or cut it."""
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        corrupt = request.match_info["digest"] in self.corrupt_blobs
        sent = 0
        async for chunk in chunks:
            if self.cdn_delay:
                await asyncio.sleep(self.cdn_delay)
            if corrupt:
                chunk = chunk.translate(INVERT)
            if self.cdn_cut_after is not None and sent + len(chunk) > self.cdn_cut_after:
                await response.write(chunk[: self.cdn_cut_after - sent])
                assert request.transport is not None
                request.transport.close()  # the client sees a short body, as on a dropped link
                return response
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response


async def relay(resp: ClientResponse, names: tuple[str, ...]) -> web.Response:
    """The backend's answer, with only the named headers (hop-by-hop ones must not leak)."""
    body = await resp.read()
    headers = {name: resp.headers[name] for name in names if name in resp.headers}
    return web.Response(status=resp.status, headers=headers, body=body or None)


async def serve(args: argparse.Namespace) -> None:
    hub = FakeHub(backend=args.backend)
    await hub.start(args.registry_port, args.token_port, args.cdn_port)
    urls = {"registry": hub.registry_url, "token": hub.token_url, "cdn": hub.cdn_url}
    print(json.dumps(urls), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await hub.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Docker Hub for tests.")
    parser.add_argument("--backend", help="URL of an auth-less registry holding the content")
    parser.add_argument("--registry-port", type=int, default=0)
    parser.add_argument("--token-port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
