"""A circuit breaker per upstream: stop asking one that keeps failing, probe it with backoff.

Closed: requests go through; `threshold` failures in a row open it. Open: requests fail at
once (the client gets a quick 503 and Docker falls back to the registry itself, instead of
hanging on timeouts). After the backoff one probe goes through: success closes the
circuit, failure reopens it for twice as long, up to `max_delay`. The probe is a client's
request, or `Upstream.probe` (a HEAD of what failed last) when no client asks, so that an
upstream back from an outage shows as up on a quiet mirror too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mirror.oci.errors import UpstreamUnavailable

FAILURE_THRESHOLD = 3
BASE_DELAY = 1.0
MAX_DELAY = 60.0
# A probe that never reports (its client went away) must not hold the circuit open forever.
PROBE_TIMEOUT = 30.0


class CircuitBreaker:
    """Failure bookkeeping for one upstream."""

    def __init__(
        self,
        name: str,
        threshold: int = FAILURE_THRESHOLD,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = threshold
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._clock = clock
        self._failures = 0
        self._delay = base_delay
        self._open_until: float | None = None
        self._probing = False
        self._probe_started = 0.0

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def before_request(self) -> None:
        """Raise at once while open; let one probe through once the backoff has passed."""
        if self._open_until is None:
            return
        now = self._clock()
        probe_pending = self._probing and now - self._probe_started < PROBE_TIMEOUT
        if now < self._open_until or probe_pending:
            wait = max(0.0, self._open_until - now)
            raise UpstreamUnavailable(
                f"upstream {self.name} is failing; next attempt in {wait:.0f}s"
            )
        self._probing = True
        self._probe_started = now

    def probe_due(self) -> bool:
        """Open, its backoff over and no probe under way: the upstream may be asked again."""
        if self._open_until is None:
            return False
        now = self._clock()
        pending = self._probing and now - self._probe_started < PROBE_TIMEOUT
        return now >= self._open_until and not pending

    def success(self) -> None:
        self._failures = 0
        self._delay = self._base_delay
        self._open_until = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._open_until = self._clock() + self._delay
            self._delay = min(self._delay * 2, self._max_delay)
            self._probing = False
