"""The series of the defences against clients that would starve the mirror: login throttling,
the password-check pool, the connection cap, the request-head deadline and the send timeout."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

DROP_REASONS = ("header_timeout", "evicted", "idle", "send_timeout")


class GuardMetrics:
    """Refusals by the mirror's own limits, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.auth_throttled = Counter(
            "mirror_client_auth_throttled",
            "Logins refused (429, or anonymous: a name that is no user's where anonymous "
            "clients may pull) before any password check, because their user name at their "
            "address, or their address, failed to log in too often lately.",
            registry=r,
        )
        self.auth_busy = Counter(
            "mirror_client_auth_busy",
            "Logins refused (503) because every password check was taken.",
            registry=r,
        )
        self.connections_open = Gauge(
            "mirror_connections_open",
            "Client connections open (server.max_connections at most).",
            multiprocess_mode="livesum",  # workers: each counts its own
            registry=r,
        )
        self.connections_refused = Counter(
            "mirror_connections_refused",
            "Connections refused (503, closed) at server.max_connections, none being "
            "closable to make room.",
            registry=r,
        )
        self.connections_dropped = Counter(
            "mirror_connections_dropped",
            "Connections the mirror closed before the client did, by reason "
            "(header_timeout: a request head not complete within server.header_timeout; "
            "evicted: the one waiting longest for a request head, to make room at "
            "server.max_connections; idle: none waiting, the one idle in keep-alive "
            "longest, to make room at server.max_connections; send_timeout: its client "
            "took none of the bytes sent to it for server.send_timeout).",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.connections_dropped.labels(reason)
