"""CPU seconds of each process in a timed part of the bench, read from /proc.

A miss then says where the time went: on two cores, the mirror, the reference server, the
upstream and the clients share them. The clients (curl, wrk, loadgen) are the bench's own
children: their time is what the bench reaped meanwhile (RUSAGE_CHILDREN).
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from tests.procmem import cpu_seconds, descendants

# name -> the pids whose time counts under that name
Procs = dict[str, frozenset[int]]
# name -> CPU seconds over one timed part
Used = dict[str, float]


def tree(pid: int) -> frozenset[int]:
    """A process and those below it now (nginx's workers, haproxy's master and worker)."""
    return frozenset(descendants(pid))


def alone(pid: int) -> frozenset[int]:
    return frozenset({pid})


def workers(prefix: str, supervisor: int) -> Procs:
    """A `workers: N` mirror: the supervisor and each worker under its own name."""
    below = sorted(descendants(supervisor) - {supervisor})
    procs = {f"{prefix}supervisor": alone(supervisor)}
    procs.update({f"{prefix}worker{i}": alone(pid) for i, pid in enumerate(below, start=1)})
    return procs


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """`with CpuMeter(procs, "curl") as cpu: ...`; then `cpu.used`, seconds by name.

    A process that ends inside the block counts 0 (its time is gone from /proc)."""

    def __init__(self, procs: Mapping[str, frozenset[int]], clients: str) -> None:
        self.procs = dict(procs)
        self.clients = clients
        self.used: Used = {}
        self._before: dict[int, float] = {}
        self._children = 0.0

    def __enter__(self) -> Self:
        pids = {pid for group in self.procs.values() for pid in group}
        self._before = {pid: cpu_seconds(pid) for pid in pids}
        self._children = _children_seconds()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        after = {pid: cpu_seconds(pid) for pid in self._before}
        for name, group in self.procs.items():
            # A process's time never goes down: less means it is gone (0 from /proc).
            spent = sum(max(0.0, after[p] - self._before[p]) for p in group)
            self.used[name] = round(spent, 2)
        self.used[self.clients] = round(_children_seconds() - self._children, 2)


def median_used(runs: list[Used]) -> Used:
    """Per process, the median over runs (a process missing from a run counts 0 there)."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {name: float(statistics.median(run.get(name, 0.0) for run in runs)) for name in names}


def shown(used: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in used.items())
