"""Public addresses only: the resolver for connections an upstream's redirect asks for.

An upstream may send the mirror to a CDN on any host; it must not send it to the mirror's
own network (a metadata service, an admin port, a neighbour). The check is made on the
addresses the connection is opened to, inside the connector: checking a name first and
connecting later would let a second DNS answer swap a private address in.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(OSError):
    """A name resolved to an address that is not public (or to none)."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, which is not a public address")
        self.host = host
        self.address = address


def is_public(address: IPAddress) -> bool:
    """Whether `address` is on the public internet: not loopback, private, link-local (the
    cloud metadata service), unique-local, unspecified, multicast, reserved or shared."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one reaches that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public(embedded)
        if address.teredo is not None:
            return False
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
    )


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an IP literal stands for, None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None


class PublicResolver(AbstractResolver):
    """Resolves through `inner` and answers only when EVERY address is public: one private
    address among public ones is refused rather than filtered, since it shows a name that
    points into the mirror's network."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if not answers:
            raise AddressRefused(host, "no address")
        for answer in answers:
            address = literal_address(answer["host"])
            if address is None or not is_public(address):
                raise AddressRefused(host, answer["host"])
        return answers

    async def close(self) -> None:
        await self._inner.close()
