"""Where one upstream may send the mirror: its redirects, its token realm, its credentials.

Registries redirect for good reasons (registry.k8s.io sends every API call to Artifact
Registry, Docker Hub and GHCR send blobs to CDNs), so a redirect is followed to:

    the upstream's own host (any port)      on its own session; Authorization only to its
                                            exact origin
    a host listed in redirect_hosts         on its own session, without Authorization
    any other HTTPS origin                  on the public-only session, whose resolver
                                            refuses names with a non-public address

and nowhere else; HTTPS is never downgraded to plain HTTP. A token realm must be on the
upstream's own host or one listed in auth_hosts (and HTTPS for an HTTPS upstream), as it
gets the upstream's credentials, and hold no userinfo (credentials of the upstream's own
choosing). Anything refused is counted, logged with the upstream and the host, and
answered 502: nothing is asked of the refused host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import aiohttp

from mirror.net.addresses import is_public, literal_address
from mirror.observe.metrics import Metrics
from mirror.oci.errors import UpstreamMisdirected

log = logging.getLogger("mirror.upstream")

# A hostile Location can be long: messages and logs show at most this much of its host.
MAX_SHOWN = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Hop:
    """A redirect allowed: the session to ask it on, and whether Authorization goes too."""

    url: str
    session: aiohttp.ClientSession
    credentials: bool


class Destinations:
    """The rules for one upstream (see the module docstring)."""

    def __init__(
        self,
        name: str,
        url: str,
        metrics: Metrics,
        *,
        own_session: aiohttp.ClientSession,
        public_session: aiohttp.ClientSession | None,
        realm_hosts: tuple[str, ...] = (),
        redirect_hosts: tuple[str, ...] = (),
    ) -> None:
        parts = urlsplit(url)
        self._name = name
        self._scheme = parts.scheme
        self._host = _hostname(parts)
        self._netloc = parts.netloc.lower()
        self._metrics = metrics
        self._own = own_session
        # None: no other origin at all (only the own host and the listed ones).
        self._public = public_session
        self._realm_hosts = [_entry(host) for host in realm_hosts]
        self._redirect_hosts = [_entry(host) for host in redirect_hosts]

    def redirect(self, url: str) -> Hop:
        """Where a redirect to `url` goes, or UpstreamMisdirected."""
        parts, port = _split(url)
        refusal = self._downgrade(parts)
        if parts is not None and refusal is None:
            host = _hostname(parts)
            if host == self._host:
                same = parts.netloc.lower() == self._netloc and parts.scheme == self._scheme
                return Hop(url, self._own, credentials=same)
            if _listed(self._redirect_hosts, host, port):
                return Hop(url, self._own, credentials=False)
            refusal = _public_refusal(parts.scheme, host)
            if refusal is None and self._public is not None:
                return Hop(url, self._public, credentials=False)
        raise self.refused_redirect(url, refusal or "not an allowed host")

    def check_realm(self, url: str) -> None:
        """UpstreamMisdirected unless `url` may be asked for a token with the credentials."""
        parts, port = _split(url)
        refusal = self._downgrade(parts)
        if parts is not None and refusal is None:
            host = _hostname(parts)
            if "@" in parts.netloc:  # credentials of the upstream's choosing, not ours
                refusal = "it holds a user name or password"
            elif host == self._host or _listed(self._realm_hosts, host, port):
                return
            else:
                refusal = "not the upstream's host nor listed in its auth_hosts"
        shown = _shown(parts)
        self._metrics.realms_refused.labels(self._name).inc()
        log.warning("upstream %s: token realm on %s refused: %s", self._name, shown, refusal)
        raise UpstreamMisdirected(
            f"upstream {self._name} sent a token realm on {shown}, refused: {refusal}"
        )

    def refused_redirect(self, url: str, why: str) -> UpstreamMisdirected:
        """Count and log a refused redirect to `url`; the error to raise."""
        shown = _shown(_split(url)[0])
        self._metrics.redirects_refused.labels(self._name).inc()
        log.warning("upstream %s: redirect to %s refused: %s", self._name, shown, why)
        return UpstreamMisdirected(f"upstream {self._name} redirected to {shown}, refused: {why}")

    def _downgrade(self, parts: SplitResult | None) -> str | None:
        if parts is None or parts.scheme not in ("http", "https") or not _hostname(parts):
            return "not an http(s) URL"
        if self._scheme == "https" and parts.scheme == "http":
            return "plain HTTP from an HTTPS upstream"
        return None


def _public_refusal(scheme: str, host: str) -> str | None:
    """Why another origin may not be asked on the public-only session, None if it may."""
    if scheme != "https":
        return "plain HTTP to a host not listed in redirect_hosts"
    # An IP literal reaches no resolver: its address is checked here instead.
    address = literal_address(host)
    if address is not None and not is_public(address):
        return "not a public address"
    return None


def _split(url: str) -> tuple[SplitResult | None, int | None]:
    """The parts of `url` and its port (the scheme's when not written); (None, None) when
    it is no URL at all."""
    try:
        parts = urlsplit(url)
        return parts, parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None, None


def _hostname(parts: SplitResult) -> str:
    return (parts.hostname or "").rstrip(".")


def _entry(host: str) -> tuple[str, int | None]:
    """(hostname, port or None for any) of a configured `host` or `host:port`."""
    parts = urlsplit(f"//{host}")
    return _hostname(parts), parts.port


def _listed(entries: list[tuple[str, int | None]], host: str, port: int | None) -> bool:
    return any(host == name and allowed in (None, port) for name, allowed in entries)


def _shown(parts: SplitResult | None) -> str:
    """host[:port] as written, for messages: never the userinfo, path or query (a signed
    URL's signature)."""
    if parts is None:
        return "an unreadable URL"
    host = _hostname(parts) or "no host"
    host = f"[{host}]" if ":" in host else host
    return (host if parts.port is None else f"{host}:{parts.port}")[:MAX_SHOWN]
