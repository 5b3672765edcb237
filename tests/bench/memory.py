"""Resident memory of a process tree, sampled in a background thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

PROC = Path("/proc")


def _parent_of(pid: str) -> int | None:
    try:
        stat = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return int(stat.rpartition(")")[2].split()[1])


def descendants(root: int) -> set[int]:
    """root and every process below it, as /proc shows them right now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent_of(entry.name)) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 once it is gone (or for a kernel thread)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    """The resident memory of root and all its descendants together."""
    return sum(rss_bytes(pid) for pid in descendants(root))


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
