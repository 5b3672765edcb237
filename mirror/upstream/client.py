"""The client side: one upstream registry, its auth, its redirects and its errors.

An `Upstream` owns nothing but state about its registry (the last Bearer challenge, the
credentials); its `ClientSession` (its own pool) and the token cache are the app's to close.
Upstream HTTP errors become `RegistryError`s here, at the boundary, so nothing above this
module looks at upstream status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from mirror.net.addresses import AddressRefused, PublicResolver
from mirror.net.tls import describe_failure
from mirror.observe.metrics import Metrics
from mirror.oci.errors import (
    BlobTooLarge,
    BlobUnknown,
    DigestMismatch,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from mirror.oci.negotiation import MANIFEST_TYPES, MAX_MANIFEST_BYTES, manifest_media_type
from mirror.oci.reference import as_digest, compute_digest
from mirror.upstream.body import BlobBody, SizeLimit, header_number, read_bounded
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.credentials import Credentials
from mirror.upstream.deadline import PAGED_EXCHANGES, exchange_deadline
from mirror.upstream.destinations import Destinations
from mirror.upstream.tokens import Challenge, TokenCache, parse_challenge
from mirror.util.lru import LRU

# Named for the concern, as before the package split: operators filter on it.
log = logging.getLogger("mirror.upstream")

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# An error body read for its OCI code: more is no registry's error.
MAX_ERROR_BYTES = 64 * 1024
NEGATIVE_ENTRIES = 10000
# A 429's Retry-After is believed for an hour at most, here and in what clients are told: a
# pull window is hours long (Docker Hub's 6 h), but asking once an hour costs nothing, and
# an 18-digit number must not hold every manifest GET back until a restart.
MAX_RETRY_AFTER = 3600
READ_BUFSIZE = 2 * 1024 * 1024
USER_AGENT = "mirror/0.1 (+pull-through cache)"
_NOT_FOUND: dict[str, type[RegistryError]] = {
    "manifest": ManifestUnknown,
    "blob": BlobUnknown,
    "tags": NameUnknown,
}


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """What a manifest response's headers say about it."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Document:
    """A small upstream answer read whole: a page of a tag list or of referrers. `absent`:
    the upstream answered one of the statuses the caller passed (no such document), that
    `status`, with `error_code` the OCI code of its error body, if any."""

    body: bytes
    link: str | None
    absent: bool = False
    error_code: str | None = None
    status: int = 200


def new_session(
    connect_timeout: float, read_timeout: float, *, public_only: bool = False
) -> aiohttp.ClientSession:
    """A ClientSession with its own connection pool (one per upstream, and for peers);
    `public_only`: it connects to public addresses only (an upstream's redirects to other
    origins: mirror/upstream/destinations.py)."""
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout, sock_read=read_timeout
    )
    # auto_decompress=False: blobs are stored exactly as sent; a gzip layer served with
    # Content-Encoding must not be unpacked on the way through.
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        # Layers arrive in large reads: aiohttp's 64 KiB default pauses the socket far
        # more often than a 512 MiB layer needs.
        read_bufsize=READ_BUFSIZE,
        headers={"User-Agent": USER_AGENT},
        connector=aiohttp.TCPConnector(
            limit=256, ttl_dns_cache=300, resolver=PublicResolver() if public_only else None
        ),
    )


class Upstream:
    """A registry the mirror pulls from, with its credentials and auth state."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        tokens: TokenCache,
        metrics: Metrics,
        name: str,
        credentials: Credentials | None = None,
        negative_ttl: float = 30.0,
        tag_ttl: float | None = None,
        timeouts: tuple[float, float] = (5.0, 30.0),
        ssl_context: ssl.SSLContext | None = None,
        *,
        public_session: aiohttp.ClientSession | None = None,
        realm_hosts: tuple[str, ...] = (),
        redirect_hosts: tuple[str, ...] = (),
        max_blob_size: int | None = None,
    ) -> None:
        if "@" in url:  # refused at load too: it would show in logs, labels and `/`
            raise ValueError("an upstream URL must not hold credentials")
        self.url = url.rstrip("/")
        # storage.max_blob_size: a larger blob is refused, or cut as it grows past it.
        self.max_blob_size = max_blob_size
        self.name = name
        self.host = urlsplit(self.url).netloc
        self.tag_ttl = tag_ttl
        # How this upstream's repositories appear in `_catalog` and the pull counts (empty
        # for the default), and the first segments that route elsewhere: set by `Upstreams`.
        self.catalog_prefix = ""
        self.routed_segments: frozenset[str] = frozenset()
        # Per-upstream connect and read timeouts (no total: a big layer takes its time).
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts[0], sock_read=timeouts[1]
        )
        # An exchange with a small answer (a manifest, a HEAD, a page, a blob's response
        # head) ends within this, however its bytes trickle: the read timeout alone lets
        # a byte every few seconds hold a pull, and every client waiting on it, for hours.
        self.exchange_deadline = exchange_deadline(*timeouts)
        self.breaker = CircuitBreaker(self.name)
        # (path, repository) of the last request that failed: what the circuit's probe asks.
        self._probe_with: tuple[str, str | None] = ("/v2/", None)
        metrics.upstream_up.labels(self.name).set(1)
        self._negative_ttl = negative_ttl
        # (kind, repo, reference) → when the upstream's 404 stops being believed.
        self._missing: LRU[tuple[str, str, str], float] = LRU(NEGATIVE_ENTRIES)
        # Docker Hub's 429 lasts until Retry-After: asking again before then only
        # lengthens the penalty, so manifest GETs are refused here until it passes.
        self._limited_until = 0.0
        self._session = session
        # Where its redirects and token realm may lead; `public_session` reaches other
        # origins on public addresses only.
        self._destinations = Destinations(
            name,
            self.url,
            metrics,
            own_session=session,
            public_session=public_session,
            realm_hosts=realm_hosts,
            redirect_hosts=redirect_hosts,
        )
        self._tokens = tokens
        self._metrics = metrics
        self._credentials = credentials
        # Learnt from the first 401, then used to fetch tokens before asking, so that a
        # new repository costs one token request and not a refused request first.
        self._bearer: Challenge | None = None
        self._use_basic = False
        # Its own CA, check and client pair (mTLS); True: aiohttp's default context.
        self.ssl: ssl.SSLContext | bool = True if ssl_context is None else ssl_context

    def catalog_name(self, repo: str) -> str:
        """The repository's name in `_catalog` and the pull counts: one that routes back to
        this upstream and repository. The default's `ghcr.io/team/app` (reached with `?ns=`)
        is `<name>/ghcr.io/team/app`, not a name of the ghcr.io upstream's `team/app`."""
        first, sep, _ = repo.partition("/")
        if not self.catalog_prefix and sep and first in self.routed_segments:
            return f"{self.name}/{repo}"
        return self.catalog_prefix + repo

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        repo: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request with auth, answering one challenge and following redirects. One
        that fails (no answer, or a 5xx) is what the circuit's probe asks again."""
        try:
            resp = await self._request(method, path, kind, repo, headers)
        except UpstreamUnavailable:
            self._probe_with = (path, repo)
            raise
        if resp.status >= 500:
            self._probe_with = (path, repo)
        return resp

    async def _request(
        self,
        method: str,
        path: str,
        kind: str,
        repo: str | None,
        headers: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        base = CIMultiDict(headers or {})
        base.setdefault("Accept-Encoding", "identity")
        auth = await self._authorization(repo)
        resp = await self._send(method, self.url + path, {**base, **auth}, kind)
        if resp.status == 401:
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.release()
            sent = auth.get("Authorization", "")
            refused = sent.removeprefix("Bearer ") if sent.startswith("Bearer ") else None
            auth = await self._answer(challenge, repo, refused)
            resp = await self._send(method, self.url + path, {**base, **auth}, kind)
        resp = await self._follow(resp, method, base, auth, kind)
        self._observe_ratelimit(resp)
        return resp

    async def _follow(
        self,
        resp: aiohttp.ClientResponse,
        method: str,
        headers: Mapping[str, str],
        auth: dict[str, str],
        kind: str,
    ) -> aiohttp.ClientResponse:
        """Follow the redirects its Destinations allow (UpstreamMisdirected for others,
        their bodies unread); Authorization goes only to the upstream's own origin."""
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or not location:
                return resp
            resp.release()
            try:
                target = urljoin(str(resp.url), location)
            except ValueError:  # no URL (`http://[::1/`): counted and refused as one
                raise self._destinations.refused_redirect(location, "not a URL") from None
            hop = self._destinations.redirect(target)
            # A CDN on another host answers 400 when it sees the registry's token.
            sent = {**headers, **(auth if hop.credentials else {})}
            resp = await self._send(method, hop.url, sent, kind, hop.session)
        resp.release()
        raise UpstreamUnavailable(
            f"upstream {self.name} redirected more than {MAX_REDIRECTS} times"
        )

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        kind: str,
        session: aiohttp.ClientSession | None = None,
    ) -> aiohttp.ClientResponse:
        self.breaker.before_request()
        started = time.monotonic()
        try:
            resp = await (session or self._session).request(
                method,
                url,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                ssl=self.ssl,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.record_failure()
            if _address_refused(exc):  # nothing was sent: the name has a non-public address
                raise self._destinations.refused_redirect(url, "not a public address") from None
            self._metrics.upstream_requests.labels(self.name, kind, "error").inc()
            tls_failure = describe_failure(self.name, exc)
            if tls_failure is not None:
                log.error("%s", tls_failure)
                raise UpstreamUnavailable(tls_failure) from None
            raise UpstreamUnavailable(
                f"upstream {self.name} unreachable: {type(exc).__name__}"
            ) from None
        self._metrics.upstream_duration.labels(self.name, kind).observe(time.monotonic() - started)
        self._metrics.upstream_requests.labels(self.name, kind, str(resp.status)).inc()
        if resp.status >= 500:
            self.record_failure()
        else:
            self.breaker.success()
            self._metrics.upstream_up.labels(self.name).set(1)
        return resp

    async def probe(self) -> None:
        """Once the open circuit's backoff is over, a HEAD of what failed last (its auth
        and redirects as a client's request has them; `/v2/` when nothing did): an answer
        below 500 closes the circuit and sets `mirror_upstream_up` again when no client
        asks meanwhile; a failure reopens it for longer. Not `/v2/` alone: an upstream
        whose manifests fail while its `/v2/` answers would look back at every probe."""
        if not self.breaker.probe_due():
            return
        path, repo = self._probe_with
        with contextlib.suppress(RegistryError):
            async with self.within_deadline("a probe"):
                resp = await self.request("HEAD", path, kind="probe", repo=repo)
                resp.release()

    def record_failure(self) -> None:
        """Count a failed exchange (also one broken mid-body) towards opening the circuit."""
        self.breaker.failure()
        if self.breaker.is_open:
            self._metrics.upstream_up.labels(self.name).set(0)

    def _check_negative(self, kind: str, repo: str, reference: str) -> None:
        """Answer a recent upstream 404 again without asking."""
        key = (kind, repo, reference)
        until = self._missing.get(key)
        if until is not None and time.monotonic() < until:
            self._metrics.negative_hits.inc()
            raise _NOT_FOUND[kind](f"{kind} {repo}:{reference} not found upstream (remembered)")

    def _remember_missing(self, kind: str, repo: str, reference: str) -> None:
        if self._negative_ttl > 0:
            self._missing.put((kind, repo, reference), time.monotonic() + self._negative_ttl)

    async def _basic(self) -> str | None:
        return None if self._credentials is None else await self._credentials.header()

    async def _authorization(self, repo: str | None) -> dict[str, str]:
        bearer = self._bearer
        if bearer is not None:
            scopes = [f"repository:{repo}:pull"] if repo else []
            try:
                return await self._bearer_header(bearer, scopes)
            except RegistryError:
                # Forgotten: the next request goes without a token and learns the
                # upstream's challenge afresh. A realm that moved, or a token service that
                # stopped answering, must not fail every request until a restart.
                if self._bearer is bearer:
                    self._bearer = None
                raise
        if self._use_basic and self._credentials is not None:
            return {"Authorization": await self._credentials.header()}
        return {}

    async def _answer(
        self, challenge: Challenge, repo: str | None, refused: str | None = None
    ) -> dict[str, str]:
        """Headers that answer a 401 challenge, or Unauthorized when we cannot; a Bearer
        challenge is remembered only once it gave a token. `refused`: the token the
        challenge answered, never sent again."""
        if challenge.scheme == "bearer":
            learnt = self._bearer_challenge(challenge)
            scope = challenge.params.get("scope")
            scopes = scope.split(" ") if scope else ([f"repository:{repo}:pull"] if repo else [])
            header = await self._bearer_header(learnt, scopes, refused)
            self._bearer = learnt
            return header
        if challenge.scheme == "basic" and self._credentials is not None:
            self._use_basic = True
            return {"Authorization": await self._credentials.header()}
        raise UpstreamUnauthorized(
            f"upstream {self.name} requires credentials the mirror does not have"
        )

    def _bearer_challenge(self, challenge: Challenge) -> Challenge:
        """The realm and service of a Bearer challenge; refused (its request fails, nothing
        is remembered) without a realm, or with one the credentials may not go to."""
        if not challenge.realm:
            raise UpstreamUnavailable(
                f"upstream {self.name} sent a Bearer challenge without a realm"
            )
        self._destinations.check_realm(challenge.realm)
        kept = {k: v for k, v in challenge.params.items() if k in ("realm", "service")}
        return Challenge("bearer", kept)

    async def _bearer_header(
        self, challenge: Challenge, scopes: list[str], refused: str | None = None
    ) -> dict[str, str]:
        token = await self._tokens.get(
            challenge,
            scopes,
            await self._basic(),
            ssl_context=self.ssl,
            upstream=self.name,
            check=self._destinations.check_realm,
            refused=refused,
        )
        return {"Authorization": f"Bearer {token}"}

    def _observe_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        for header, gauge in (
            ("ratelimit-remaining", self._metrics.ratelimit_remaining),
            ("ratelimit-limit", self._metrics.ratelimit_limit),
        ):
            value = header_number(resp.headers.get(header, "").partition(";")[0].strip())
            if value is not None:
                gauge.labels(self.name).set(value)

    def raise_for_status(self, resp: aiohttp.ClientResponse, kind: str, what: str) -> None:
        """Turn an upstream error status into the matching registry error."""
        status = resp.status
        if status < 300:
            return
        resp.release()
        if status == 404 and kind in _NOT_FOUND:
            raise _NOT_FOUND[kind](f"{what} not found upstream")
        if status == 401:
            raise UpstreamUnauthorized(f"upstream {self.name} refused access to {what}")
        if status == 403:
            raise UpstreamDenied(f"upstream {self.name} denied access to {what}")
        if status == 429:
            retry_after = _retry_after(resp.headers)
            # Pulls are counted on manifest GETs (Docker Hub's limit): a blob's 429, its
            # CDN's after a redirect, or a tag list's says nothing about them.
            if kind == "manifest":
                self._limited_until = time.monotonic() + retry_after
            raise TooManyRequests(f"upstream {self.name} rate limit reached", retry_after)
        raise UpstreamUnavailable(f"upstream {self.name} answered {status} for {what}")

    @contextlib.asynccontextmanager
    async def within_deadline(self, what: str, exchanges: float = 1) -> AsyncIterator[None]:
        """The block as one exchange (or `exchanges` of them): UpstreamUnavailable when it
        outlasts the deadline (counted towards the circuit breaker as any failed exchange)."""
        deadline = exchanges * self.exchange_deadline
        try:
            async with asyncio.timeout(deadline):
                yield
        except TimeoutError:
            self.record_failure()
            raise UpstreamUnavailable(
                f"upstream {self.name} took over {deadline:g}s for {what}"
            ) from None

    def within_paging_deadline(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Every page of a paged document (a tag list, referrers) together, however many:
        each page within its own deadline still lets a slow upstream hold the request, and
        everyone joined to it, for hours."""
        return self.within_deadline(what, PAGED_EXCHANGES)

    async def manifest(
        self, repo: str, reference: str, accept: list[str], *, head: bool
    ) -> tuple[ManifestInfo, bytes | None]:
        """HEAD or GET a manifest; a GET's bytes are checked against the digest header."""
        what = f"manifest {repo}:{reference}"
        async with self.within_deadline(what):
            return await self._manifest(repo, reference, accept, head, what)

    async def _manifest(
        self, repo: str, reference: str, accept: list[str], head: bool, what: str
    ) -> tuple[ManifestInfo, bytes | None]:
        self._check_negative("manifest", repo, reference)
        wait = self._limited_until - time.monotonic()
        if not head and wait > 0:
            retry_after = min(MAX_RETRY_AFTER, int(wait) + 1)
            raise TooManyRequests(f"upstream {self.name} rate limit reached", retry_after)
        headers = {"Accept": ", ".join(accept or MANIFEST_TYPES)}
        resp = await self.request(
            "HEAD" if head else "GET",
            f"/v2/{repo}/manifests/{reference}",
            kind="manifest",
            repo=repo,
            headers=headers,
        )
        async with resp:
            if resp.status == 404:
                self._remember_missing("manifest", repo, reference)
            self.raise_for_status(resp, "manifest", what)
            declared = resp.headers.get("Content-Type", "").partition(";")[0].strip()
            claimed = self._claimed_digest(resp.headers.get("Docker-Content-Digest"))
            # A HEAD's "" (no manifest type named) or size 0 (no length: a manifest is never
            # empty) is what the caller learns some other way, with a GET at worst.
            if head:
                size = resp.content_length or 0
                if size > MAX_MANIFEST_BYTES:  # the GET's refusal now, not a record it fails
                    raise _too_large(what, MAX_MANIFEST_BYTES)
                media_type = self._known_type(declared, None) or ""
                return ManifestInfo(claimed, media_type, size), None
            body = await _read_limited(resp, MAX_MANIFEST_BYTES, what)
        claim = as_digest(claimed)
        if claim is not None and compute_digest(body, claim.algorithm) != claim:
            self._metrics.digest_mismatches.labels("manifest").inc()
            raise DigestMismatch(f"upstream sent {what} whose bytes do not match its digest")
        kept = self._known_type(declared, body)
        if kept is None:
            raise ManifestInvalid(f"upstream {self.name} sent {what} of no manifest media type")
        return ManifestInfo(str(compute_digest(body)), kept, len(body)), body

    def _claimed_digest(self, value: str | None) -> str:
        """A Docker-Content-Digest header's digest; "" when absent or not a digest (then
        counted): such a value never reaches a record, a file name, a header or the log."""
        if value is None:
            return ""
        if as_digest(value) is None:
            self._metrics.upstream_guard.headers_refused.labels(
                self.name, "Docker-Content-Digest"
            ).inc()
            return ""
        return value

    def _known_type(self, declared: str, body: bytes | None) -> str | None:
        """The manifest's media type (negotiation.manifest_media_type), a Content-Type
        that is no manifest type counted as refused."""
        if declared and declared not in MANIFEST_TYPES:
            self._metrics.upstream_guard.headers_refused.labels(self.name, "Content-Type").inc()
        return manifest_media_type(declared, body)

    async def open_blob(self, repo: str, digest: str, offset: int = 0) -> BlobBody:
        """The blob's body, asked from `offset` (the caller releases it). The upstream may
        answer from elsewhere (a 200 starts at byte 0): the body's `offset` says where."""
        self._check_negative("blob", repo, digest)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self.within_deadline(f"blob {digest}"):  # its head: the body takes its time
            resp = await self.request(
                "GET", f"/v2/{repo}/blobs/{digest}", kind="blob", repo=repo, headers=headers
            )
        if resp.status == 404:
            self._remember_missing("blob", repo, digest)
        self.raise_for_status(resp, "blob", f"blob {digest}")
        body = BlobBody.of(resp, self._blob_limit(digest), offset or None)
        if body is None:
            resp.release()
            asked = f"its bytes from {offset}" if offset else "all of it"
            span = resp.headers.get("Content-Range", "")[:100]
            raise UpstreamUnavailable(
                f"upstream {self.name} answered a request for {asked} of blob {digest} with "
                f"another part (Content-Range {span!r})"
            )
        return body

    async def blob_size(self, repo: str, digest: str) -> int | None:
        """The blob's size from a HEAD, None when the upstream does not say."""
        self._check_negative("blob", repo, digest)
        async with self.within_deadline(f"blob {digest}"):
            resp = await self.request("HEAD", f"/v2/{repo}/blobs/{digest}", kind="blob", repo=repo)
            async with resp:
                if resp.status == 404:
                    self._remember_missing("blob", repo, digest)
                self.raise_for_status(resp, "blob", f"blob {digest}")
                size = resp.content_length
        limit = self._blob_limit(digest)
        if limit is not None and size is not None and size > limit.most:
            raise limit.refused()
        return size

    def _blob_limit(self, digest: str) -> SizeLimit | None:
        """storage.max_blob_size for this blob, its refusal counted and naming this upstream."""
        most = self.max_blob_size
        if most is None:
            return None

        def refused() -> BlobTooLarge:
            self._metrics.upstream_guard.blob_too_large.labels(self.name).inc()
            return BlobTooLarge(
                f"upstream {self.name} sent blob {digest} larger than "
                f"storage.max_blob_size ({most} bytes)"
            )

        return SizeLimit(most, refused)

    async def document(
        self,
        path: str,
        repo: str,
        kind: str,
        *,
        accept: str,
        limit: int,
        passed: frozenset[int] = frozenset(),
    ) -> Document:
        """GET a JSON document of at most `limit` bytes (ManifestInvalid past it) with its
        `Link`. An error status raises its registry error, except those in `passed`: their
        answer comes back as it is, for the caller to judge (its body bounded too)."""
        what = f"{kind} of {repo}"
        async with self.within_deadline(what):
            return await self._document(path, repo, kind, what, accept, limit, passed)

    async def _document(
        self,
        path: str,
        repo: str,
        kind: str,
        what: str,
        accept: str,
        limit: int,
        passed: frozenset[int],
    ) -> Document:
        resp = await self.request("GET", path, kind=kind, repo=repo, headers={"Accept": accept})
        async with resp:
            if resp.status in passed:
                error = await _read_limited(resp, MAX_ERROR_BYTES, what)
                code = _error_code(error)
                return Document(b"", None, absent=True, error_code=code, status=resp.status)
            self.raise_for_status(resp, kind, what)
            body = await _read_limited(resp, limit, what)
            return Document(body, resp.headers.get("Link"))


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    try:
        return await read_bounded(resp, limit, lambda: _too_large(what, limit))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"reading {what} failed: {type(exc).__name__}") from None


def _too_large(what: str, limit: int) -> ManifestInvalid:
    return ManifestInvalid(f"{what} is larger than {limit} bytes")


def _address_refused(exc: BaseException) -> bool:
    """Whether the public-only resolver refused the name (see mirror/net/addresses.py)."""
    return isinstance(getattr(exc, "os_error", None), AddressRefused)


def _retry_after(headers: Mapping[str, str]) -> int:
    value = header_number(headers.get("Retry-After", ""))
    return 60 if value is None else min(value, MAX_RETRY_AFTER)


def _error_code(body: bytes) -> str | None:
    """The first OCI error code of an error body, if it is one."""
    try:
        errors = json.loads(body).get("errors")
        return str(errors[0]["code"])
    except (ValueError, AttributeError, LookupError, TypeError, RecursionError):
        return None
