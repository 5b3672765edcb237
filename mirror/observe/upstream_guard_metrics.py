"""The series of the defences against upstreams that would fill the disk or poison the cache:
blobs over storage.max_blob_size and answers whose headers are refused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

# The upstream headers whose values are checked before anything keeps or repeats them.
CHECKED_HEADERS = ("Docker-Content-Digest", "Content-Type")


class UpstreamGuardMetrics:
    """Refusals of what an upstream sent, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.blob_too_large = Counter(
            "mirror_blob_too_large",
            "Upstream blobs refused or cut for being larger than storage.max_blob_size "
            "(by their Content-Length, or as they grew), by upstream.",
            ["upstream"],
            registry=r,
        )
        self.headers_refused = Counter(
            "mirror_upstream_headers_refused",
            "Upstream answers whose header was not used, by upstream and header "
            "(Docker-Content-Digest: not a digest; Content-Type: not a manifest media type).",
            ["upstream", "header"],
            registry=r,
        )
