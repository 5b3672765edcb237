"""Which upstream a request is for: `?ns=`, a path prefix, or the default.

containerd appends `?ns=<registry>` to every request it sends a mirror; podman's
registries.conf and plain clients can put the registry first in the path instead
(`/v2/ghcr.io/owner/image/...`). Anything else goes to the default upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

from mirror.config import DOCKER_HUB_HOSTS
from mirror.oci.errors import NameUnknown
from mirror.oci.reference import validate_name
from mirror.upstream.client import Upstream
from mirror.util.lru import LRU

# Requests' names routed and validated, remembered: every request of a pull names its
# repository, and the name grammar is the dearest check on the way. Client-chosen: bounded.
ROUTED = 4096


class Upstreams:
    """Every configured upstream, by the registry name clients use."""

    def __init__(self, default: Upstream, others: list[Upstream]) -> None:
        self.default = default
        for upstream in others:
            upstream.catalog_prefix = f"{upstream.name}/"
        self._by_name = {upstream.name: upstream for upstream in [default, *others]}
        # Docker Hub answers to several names. Docker's registry-mirrors asks a mirror for
        # Docker Hub images only (with ?ns=docker.io in its containerd image store): with
        # no upstream named docker.io, the default one is taken to stand in for it.
        hub = self._by_name.get("docker.io", default)
        for alias in DOCKER_HUB_HOSTS:
            self._by_name.setdefault(alias, hub)
        # A repository's catalogue name is routed without `ns` (web/catalog.py): the
        # default's repositories whose first segment routes are named with its name first.
        default.routed_segments = frozenset(self._by_name)
        self._routed: LRU[tuple[str, str | None], tuple[Upstream, str]] = LRU(ROUTED)

    def __iter__(self) -> Iterator[Upstream]:
        return iter({id(u): u for u in self._by_name.values()}.values())

    def get(self, name: str) -> Upstream | None:
        return self._by_name.get(name)

    def validated_route(self, name: str, ns: str | None) -> tuple[Upstream, str]:
        """`route` for a request's name, the name and the repository upstream both valid
        (else NameInvalid)."""
        key = (name, ns)
        found = self._routed.get(key)
        if found is None:
            upstream, repo = self.route(validate_name(name), ns)
            found = (upstream, validate_name(repo))
            self._routed.put(key, found)
        return found

    def route(self, name: str, ns: str | None) -> tuple[Upstream, str]:
        """(upstream, repository name upstream) for a request's name and `ns` query."""
        first, sep, rest = name.partition("/")
        if ns:
            upstream = self._by_name.get(ns)
            if upstream is None:
                raise NameUnknown(f"registry {ns[:100]!r} is not mirrored here")
            # A client may send both: `?ns=ghcr.io` and `/v2/ghcr.io/owner/image`.
            prefixed = sep and self._by_name.get(first) is upstream
            return upstream, rest if prefixed else name
        if sep and first in self._by_name:
            return self._by_name[first], rest
        return self.default, name
