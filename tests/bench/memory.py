"""Resident memory of a process tree, sampled in a background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from tests.procmem import descendants, rss_bytes, tree_rss

__all__ = ["RssSampler", "descendants", "rss_bytes", "tree_rss"]


@dataclass
class RssSampler:
    """Samples tree_rss(pid) every `interval` seconds until stopped; a context manager."""

    pid: int
    interval: float = 0.2
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            if rss:
                self.samples.append((round(time.monotonic() - start, 2), rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def max_bytes(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    @property
    def final_bytes(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
