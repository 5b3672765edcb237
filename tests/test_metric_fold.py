"""Dead workers' metric files folded into one pair (mirror/observe/workerfiles.py): the sums
stay exact while scrapes run beside the folds, neither doubled (folded, not yet removed)
nor short (removed between a scrape's listing and its read)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict, mmap_key

from mirror.observe.workerfiles import WorkerFilesCollector, fold_dead, others_pulls

DEAD = 150
HELP = "Requests."


def write_counter(path: Path, pid: int, value: float) -> None:
    values = MmapedDict(str(path / f"counter_{pid}.db"))
    key = mmap_key("requests", "requests_total", ["route"], ["base"], HELP)
    values.write_value(key, value, 0.0)
    values.close()


def write_histogram(path: Path, pid: int) -> None:
    values = MmapedDict(str(path / f"histogram_{pid}.db"))
    for name, labels, value in (
        ("duration_seconds_bucket", {"le": "0.1"}, 2.0),
        ("duration_seconds_bucket", {"le": "+Inf"}, 1.0),
        ("duration_seconds_sum", {}, 0.5),
    ):
        key = json.dumps(("duration_seconds", name, labels, HELP), sort_keys=True)
        values.write_value(key, value, 0.0)
    values.close()


def sums(collector: WorkerFilesCollector) -> dict[str, float]:
    found = {}
    for metric in collector.collect():
        for sample in metric.samples:
            if sample.labels.get("le") in (None, "+Inf"):
                found[sample.name] = sample.value
    return found


def test_folding_keeps_every_count_and_leaves_one_pair_of_files(tmp_path: Path) -> None:
    for pid in range(1, DEAD + 2):
        write_counter(tmp_path, pid, pid)
        write_histogram(tmp_path, pid)
    collector = WorkerFilesCollector(tmp_path)
    whole = sums(collector)
    assert whole["requests_total"] == sum(range(1, DEAD + 2))
    assert whole["duration_seconds_count"] == 3 * (DEAD + 1)

    seen: list[dict[str, float]] = []
    failures: list[BaseException] = []
    folding = threading.Event()

    def scrape() -> None:
        try:
            while not folding.is_set():
                seen.append(sums(collector))
        except BaseException as exc:  # a file gone between the listing and the read
            failures.append(exc)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for pid in range(1, DEAD + 1):  # the last one lives on
            fold_dead(tmp_path, pid)
            time.sleep(0.002)  # workers die apart: scrapes come between the folds
    finally:
        folding.set()
        scraper.join()

    assert not failures, failures[0]
    assert len(seen) > 5
    assert all(found == whole for found in seen), [f for f in seen if f != whole][0]
    assert sums(collector) == whole
    left = sorted(f.name for f in tmp_path.glob("*.db"))
    assert left == [
        "counter_151.db",
        "counter_folded.db",
        "histogram_151.db",
        "histogram_folded.db",
    ]


def test_a_worker_that_never_counted_anything_folds_to_nothing(tmp_path: Path) -> None:
    fold_dead(tmp_path, 7)
    assert not list(tmp_path.glob("*.db"))


def test_a_dead_workers_pulls_are_folded_and_still_shown(tmp_path: Path) -> None:
    """The status page's pulls per repository: a live worker's file, a dead one's folded
    (twice over: the sum grows), this process's own file left out (it counts in memory)."""
    write_pulls(tmp_path, 101, {"library/a": 3, "library/b": 1})
    write_pulls(tmp_path, 102, {"library/a": 2})
    write_pulls(tmp_path, 103, {"library/c": 7})
    write_pulls(tmp_path, os.getpid(), {"library/own": 100})
    fold_dead(tmp_path, 101)
    fold_dead(tmp_path, 102)
    names = {p.name for p in tmp_path.glob("pulls_*.json")}
    assert names == {"pulls_103.json", "pulls_folded.json", f"pulls_{os.getpid()}.json"}
    assert others_pulls(tmp_path) == {"library/a": 5, "library/b": 1, "library/c": 7}
    (tmp_path / "pulls_103.json").write_text('{"library/c": "7", "x": -1}')  # not counts
    assert others_pulls(tmp_path) == {"library/a": 5, "library/b": 1}


def write_pulls(path: Path, pid: int, counts: dict[str, int]) -> None:
    (path / f"pulls_{pid}.json").write_text(json.dumps(counts))
