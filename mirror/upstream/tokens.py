"""Upstream authentication: parsing `WWW-Authenticate` challenges and caching Bearer tokens.

Tokens are cached per (realm, service, scope) until shortly before they expire, and fetched
once however many requests want the same one at the same moment; with a `TokenShare`, once
across the processes that share it too (cluster/tokenshare.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiocache import SimpleMemoryCache

from mirror.net.tls import describe_failure
from mirror.observe.metrics import Metrics
from mirror.oci.errors import UpstreamDenied, UpstreamUnauthorized, UpstreamUnavailable
from mirror.upstream.body import read_bounded
from mirror.upstream.deadline import session_deadline
from mirror.util.singleflight import SingleFlight

log = logging.getLogger(__name__)

# key=value or key="quoted, with \" escapes"; values separated by commas.
_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')
# Refetch this long before the upstream says a token expires, so that no request goes out
# with a token about to lapse in flight. Docker Hub's tokens last 300 s.
EXPIRY_MARGIN = 30.0
# Tokens that come without expires_in last 60 s, as the distribution spec says.
DEFAULT_EXPIRES_IN = 60
# A token is kept no longer than this, whatever its service says (registries' last
# minutes; Docker Hub's 300 s): a service could otherwise have one kept for ever, and the
# shared store (cluster/tokenshare.py) turns its expiry into whole milliseconds.
MAX_EXPIRES_IN = 3600
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# A token response is a JWT or two in a small JSON object; more is no token service's.
MAX_TOKEN_BYTES = 64 * 1024
# A token goes into every request's Authorization header: only RFC 6750's b64token (the
# characters of base64 and base64url, `=` at its end) is taken, so no CR, LF or space can
# split or bend that header, and at most 16 KiB of it (registries' JWTs run to a few KiB).
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MAX_TOKEN_LENGTH = 16 * 1024
# Raises for a URL the credentials may not go to (Destinations.check_realm).
RealmCheck = Callable[[str], None]


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: the scheme and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge:
    """Parse `Bearer realm="...",service="...",scope="a,b"` (quoted commas included)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if not match or match.end() == pos:
            break
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
        pos = match.end()
    return Challenge(scheme.lower(), params)


def basic_authorization(username: str, password: str) -> str:
    """The value of an `Authorization: Basic` header."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class TokenShare(Protocol):
    """Tokens shared with other processes: (token, seconds to keep it) under `key`,
    another process's or what `fetch()` gets (then shared)."""

    async def once(
        self, key: str, fetch: Callable[[], Awaitable[tuple[str, float]]]
    ) -> tuple[str, float]: ...


class TokenCache:
    """Bearer tokens by (realm, service, scope), fetched once and kept until near expiry."""

    def __init__(
        self, session: aiohttp.ClientSession, metrics: Metrics, shared: TokenShare | None = None
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._shared = shared
        self._cache = SimpleMemoryCache()
        # Concurrent requests for one scope share one fetch, which belongs to none of
        # them: a request that is cancelled fails no one else.
        self._flight = SingleFlight()

    async def get(
        self,
        challenge: Challenge,
        scopes: list[str],
        credentials: str | None,
        ssl_context: ssl.SSLContext | bool = True,
        upstream: str = "",
        check: RealmCheck | None = None,
        refused: str | None = None,
    ) -> str:
        """A token for `scopes` from the challenge's realm, from cache when still good.

        `credentials` is a ready `Authorization` header value (Basic) or None: anonymous;
        `ssl_context` is the asking upstream's TLS context (its realm is usually its own host);
        `check` vets the realm and every redirect of it (none followed without it);
        `refused`: a token the registry refused (revoked, or its key rotated) before it
        expired: it is not given again, a new one is fetched (once for all refused with it).
        """
        # Per account too: two upstreams may share a token service but not an account.
        account = hashlib.sha256((credentials or "").encode()).hexdigest()
        parts = [challenge.realm or "", challenge.params.get("service", ""), account, *scopes]
        key = "\0".join(parts)
        token: str | None = await self._cache.get(key)
        if token is not None and token != refused:
            return token
        return await self._flight.do(
            key,
            lambda: self._fetch_and_keep(
                key, challenge, scopes, credentials, ssl_context, upstream, check, refused
            ),
        )

    async def close(self) -> None:
        await self._flight.close()

    async def _fetch_and_keep(
        self,
        key: str,
        challenge: Challenge,
        scopes: list[str],
        credentials: str | None,
        ssl_context: ssl.SSLContext | bool = True,
        upstream: str = "",
        check: RealmCheck | None = None,
        refused: str | None = None,
    ) -> str:
        def fetch() -> Awaitable[tuple[str, float]]:
            return self._fetch(challenge, scopes, credentials, ssl_context, upstream, check)

        if self._shared is None:
            token, ttl = await fetch()
        else:  # hashed: the shared store never sees the realm, account or scopes
            token, ttl = await self._shared.once(hashlib.sha256(key.encode()).hexdigest(), fetch)
            if token == refused:  # still shared until it expires: each process gets its own
                token, ttl = await fetch()
        await self._cache.set(key, token, ttl=ttl)
        return token

    async def _fetch(
        self,
        challenge: Challenge,
        scopes: list[str],
        credentials: str | None,
        ssl_context: ssl.SSLContext | bool = True,
        upstream: str = "",
        check: RealmCheck | None = None,
    ) -> tuple[str, float]:
        realm = challenge.realm
        if not realm:
            raise UpstreamUnavailable("upstream sent a Bearer challenge without a realm")
        params = [("scope", scope) for scope in scopes]
        if "service" in challenge.params:
            params.insert(0, ("service", challenge.params["service"]))
        # Counted under the upstream's name: the realm is the upstream's to vary at will.
        host = urlsplit(realm).netloc.rpartition("@")[2]
        label = upstream or host
        try:
            async with asyncio.timeout(session_deadline(self._session)):  # a trickle ends
                return await self._ask(realm, params, credentials, ssl_context, check, label)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._metrics.token_fetches.labels(label, "error").inc()
            tls_failure = describe_failure(f"{label} (token service {host})", exc)
            if tls_failure is not None:
                log.error("%s", tls_failure)
                raise UpstreamUnavailable(tls_failure) from None
            raise UpstreamUnavailable(
                f"upstream token service failed: {type(exc).__name__}"
            ) from None

    async def _ask(
        self,
        realm: str,
        params: list[tuple[str, str]],
        credentials: str | None,
        ssl_context: ssl.SSLContext | bool,
        check: RealmCheck | None,
        label: str,
    ) -> tuple[str, float]:
        """GET a token from the realm, following the redirects `check` allows (none
        without one): the credentials go only where a realm may be. `label`: the
        upstream's, for the metric."""
        headers = {"Authorization": credentials} if credentials else {}
        url, query = realm, params
        for _ in range(MAX_REDIRECTS + 1):
            if check is not None:
                check(url)
            async with self._session.get(
                url, params=query, headers=headers, ssl=ssl_context, allow_redirects=False
            ) as resp:
                self._metrics.token_fetches.labels(label, str(resp.status)).inc()
                location = resp.headers.get("Location")
                if resp.status not in REDIRECTS or not location or check is None:
                    return _token_from(await _token_body(resp))
                url, query = urljoin(str(resp.url), location), []
        raise UpstreamUnavailable(f"upstream token service redirected over {MAX_REDIRECTS} times")


async def _token_body(resp: aiohttp.ClientResponse) -> object:
    if resp.status in (401, 403):
        # The account's credentials were refused: say so without echoing them.
        raise UpstreamDenied("the mirror's upstream credentials were refused")
    if resp.status != 200:
        raise UpstreamUnavailable(f"upstream token service answered {resp.status}")
    body = await read_bounded(resp, MAX_TOKEN_BYTES, _too_large)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        raise UpstreamUnavailable("upstream token service sent no JSON") from None


def _too_large() -> UpstreamUnavailable:
    return UpstreamUnavailable(f"upstream token service sent over {MAX_TOKEN_BYTES} bytes")


def _token_from(body: object) -> tuple[str, float]:
    """(token, seconds to cache it) from a token response body."""
    if not isinstance(body, dict):
        raise UpstreamUnauthorized("upstream token service sent no token")
    token = body.get("token") or body.get("access_token")
    if not isinstance(token, str) or not token:
        raise UpstreamUnauthorized("upstream token service sent no token")
    if len(token) > MAX_TOKEN_LENGTH or not _TOKEN68.fullmatch(token):
        # Unshown: a value that is no token may be anything. Not kept, not shared.
        raise UpstreamUnavailable(
            "upstream token service sent no well-formed token "
            f"(RFC 6750 b64token, at most {MAX_TOKEN_LENGTH} characters)"
        )
    expires_in = _lifetime(body.get("expires_in"))
    margin = min(EXPIRY_MARGIN, expires_in / 5)
    return token, max(1.0, expires_in - margin)


def _lifetime(expires_in: object) -> float:
    """Seconds a token lasts by its `expires_in`, at most MAX_EXPIRES_IN; the default for
    anything but a positive number (true, NaN and Infinity are none: JSON may say the
    last two, and reads 1e400 as Infinity)."""
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        return DEFAULT_EXPIRES_IN
    if not 0 < expires_in < math.inf:
        return DEFAULT_EXPIRES_IN
    return min(expires_in, MAX_EXPIRES_IN)
