"""A stopping replica's drain: /readyz answers 503 from SIGTERM on, while it still serves."""

from __future__ import annotations

import time


class Drain:
    """Whether the process was told to stop, and since when (monotonic seconds)."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
