"""The workers' metric files (prometheus-client's multiprocess mode), read and folded.

Each worker writes its counters and histograms to files named by its pid. A dead worker's
counts must stay in the sums (a counter that drops reads as a reset to Prometheus), but
one file pair per dead worker made every scrape slower for as long as the supervisor ran: a
worker crashing every half minute left thousands. So the supervisor folds a dead worker's
files into one pair (`counter_folded.db`, `histogram_folded.db`), adding value to value,
and removes them; its `mostrecent` gauges (the upstream's pull budget) into
`gauge_mostrecent_folded.db`, the newest value of each kept. Scrapes read under a shared
lock and the fold takes it exclusively, so no scrape sees a count twice (folded, not yet
removed) or not at all.

The status page's pulls per repository are not metrics (a label per repository would
have /metrics grow with every repository pulled): each worker publishes its counts to
`pulls_<pid>.json` here, the page adds up the others' to its own, and a dead worker's
are folded into `pulls_folded.json` with its metric files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror.util.files import write_replacing

FOLD_LOCK = "fold.lock"  # not *.db: the collector's glob passes it by
FOLDED = "folded"  # where the pid goes in a file's name
ADDED_UP = ("counter", "histogram")  # the kinds whose files add up
# Gauges whose latest value stands after its worker died (the upstream's pull budget): the
# newest of each is kept. Other gauges are the live workers' alone, dropped with a dead one.
LATEST = "gauge_mostrecent"


class WorkerFilesCollector(Collector):
    """Every worker's values, summed, read while no fold runs."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._files = MultiProcessCollector(None, str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        with _locked(self._path, fcntl.LOCK_SH):
            return list(self._files.collect())  # type: ignore[no-untyped-call]


class OnlyNamed(Collector):
    """The samples of `collector` named in `names` (/metrics?name[]=…). The registry's own
    `restricted_registry` finds a collector by the names it registered under, and the
    workers' collector has none before it reads the files: it gave nothing."""

    def __init__(self, collector: Collector, names: Iterable[str]) -> None:
        self._collector = collector
        self._names = frozenset(names)

    def collect(self) -> Iterable[Metric]:
        for family in self._collector.collect():
            kept = [sample for sample in family.samples if sample.name in self._names]
            if kept:
                only = Metric(family.name, family.documentation, family.type, family.unit)
                only.samples = kept
                yield only


PULLS = "pulls"
PULLS_KEPT = 1000  # the repositories a worker publishes: its most pulled
PULLS_FOLDED_KEPT = 10000


def publish_pulls(path: Path, counts: dict[str, int]) -> None:
    """This worker's pulls per repository, its PULLS_KEPT most pulled (blocking)."""
    top = dict(Counter(counts).most_common(PULLS_KEPT))
    write_replacing(path / f"{PULLS}_{os.getpid()}.json", json.dumps(top))


def others_pulls(path: Path) -> Counter[str]:
    """The other workers' published pulls and the dead ones' folded sum (blocking)."""
    own = f"{PULLS}_{os.getpid()}.json"
    total: Counter[str] = Counter()
    with _locked(path, fcntl.LOCK_SH):
        for found in path.glob(f"{PULLS}_*.json"):
            if found.name != own:
                total.update(_pulls(found))
    return total


def _pulls(path: Path) -> dict[str, int]:
    """A pulls file's counts; nothing from one gone or not of that form."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if isinstance(k, str) and type(v) is int and v > 0}


def _fold_pulls(path: Path, pid: int) -> None:
    """Add a dead worker's pulls to the folded file (under the exclusive lock)."""
    dead = path / f"{PULLS}_{pid}.json"
    if not dead.exists():
        return
    folded = path / f"{PULLS}_{FOLDED}.json"
    total = Counter(_pulls(folded))
    total.update(_pulls(dead))
    write_replacing(folded, json.dumps(dict(total.most_common(PULLS_FOLDED_KEPT))))
    dead.unlink()


def fold_dead(path: Path, pid: int) -> list[str]:
    """Add a dead worker's counters, histograms, latest gauges and pulls to the folded
    files, then remove its files (blocking: waits for a scrape in progress). The names of
    those that could not be read, removed too: left, they would fail every scrape."""
    unreadable = []
    folds = [(kind, _add) for kind in ADDED_UP] + [(LATEST, _keep_latest)]
    with _locked(path, fcntl.LOCK_EX):
        for kind, fold in folds:
            dead = path / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            try:
                values = _values(dead)
            except (struct.error, ValueError):  # torn (a full disk under its mmap)
                unreadable.append(dead.name)
                values = []
            if values:
                fold(path / f"{kind}_{FOLDED}.db", values)
            dead.unlink()
        _fold_pulls(path, pid)
    return unreadable


def _values(path: Path) -> list[tuple[str, float, float]]:
    """(key, value, time set) of every sample in a file; each key must be what scrapes
    parse."""
    found = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
    values = [(key, value, stamp) for key, value, stamp, _ in found]
    for key, _, _ in values:
        json.loads(key)
    return values


def _keep_latest(path: Path, values: list[tuple[str, float, float]]) -> None:
    folded = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    try:
        for key, value, stamp in values:
            _, kept = folded.read_value(key)  # type: ignore[no-untyped-call]
            if stamp > kept:
                folded.write_value(key, value, stamp)  # type: ignore[no-untyped-call]
    finally:
        folded.close()  # type: ignore[no-untyped-call]


def _add(path: Path, values: list[tuple[str, float, float]]) -> None:
    folded = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    try:
        for key, value, _ in values:
            current, _ = folded.read_value(key)  # type: ignore[no-untyped-call]
            folded.write_value(key, current + value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        folded.close()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _locked(path: Path, how: int) -> Iterator[None]:
    fd = os.open(path / FOLD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)
