"""Which peers may speak for a client: X-Forwarded-* believed from `trusted_proxies` only.

Anyone can send X-Forwarded-For; only a proxy the operator named can be believed. Each
proxy appends the address it saw to the right of the header, so the list is read from the
right: trusted hops are skipped, and the first address no trusted proxy could have made up
is the client's. A malformed entry ends the walk at the hop that passed it on.

X-Forwarded-Proto and -Host are read the same way: of the N trusted proxies the walk went
through, the client-facing one is the N-th value from the right (a proxy that appends its
own after a value its client sent leaves the client's on the left, never counted).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mirror.config.values import Network

# A host and optional port as a Host header holds it (a realm URL is built from it).
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)
_SCHEMES = frozenset({"http", "https"})


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


@dataclass(frozen=True)
class Origin:
    """Who a request is from and the URL base it was addressed to."""

    client: str
    scheme: str
    host: str


class TrustedProxies:
    """The configured proxies, and what their headers say about a request."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)

    def trusts(self, peer: str | None) -> bool:
        if not self._networks:  # the usual case, asked on every request: no parse
            return False
        address = _address(peer or "")
        return address is not None and any(address in net for net in self._networks)

    def client(self, peer: str, forwarded_for: str | None) -> str:
        """The right-most address of X-Forwarded-For that no trusted proxy added."""
        return self._walk(peer, forwarded_for)[0]

    def _walk(self, peer: str, forwarded_for: str | None) -> tuple[str, int]:
        """The client, and how many trusted proxies passed the request on (the peer one)."""
        client, trusted = peer, 0
        hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(client):
                break
            trusted += 1
            address = _address(hop)
            if address is None:
                break
            client = str(address)
        return client, max(trusted, 1)

    def origin(self, peer: str, scheme: str, host: str, headers: dict[str, str]) -> Origin:
        """The client, scheme and host of a request from `peer` with proxy `headers`."""
        if not headers or not self.trusts(peer):
            return Origin(peer, scheme, host)
        client, trusted = self._walk(peer, headers.get("X-Forwarded-For"))
        proto = _nth_from_right(headers.get("X-Forwarded-Proto"), trusted).lower()
        forwarded_host = _nth_from_right(headers.get("X-Forwarded-Host"), trusted)
        return Origin(
            client,
            proto if proto in _SCHEMES else scheme,
            forwarded_host if _HOST.fullmatch(forwarded_host) else host,
        )


def _nth_from_right(values: str | None, n: int) -> str:
    """The value the client-facing one of `n` trusted proxies wrote: the n-th from the
    right, or the left-most when fewer proxies appended one ("" when none)."""
    listed = [value.strip() for value in (values or "").split(",")]
    return listed[max(len(listed) - n, 0)]
