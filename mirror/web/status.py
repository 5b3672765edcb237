"""The status page at `/`: upstreams and their health, hit ratios, cache size, top
repositories. Plain HTML from the metrics the mirror already keeps; no scripts.

A private repository's name says a lot: on a client listener the page names only the
repositories its viewer may pull (mirror/web/access.py decides, as the catalogue does).
"""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from mirror.config import Config
from mirror.observe.metrics import Metrics
from mirror.observe.workerfiles import others_pulls
from mirror.upstream.routing import Upstreams
from mirror.util.lru import LRU
from mirror.util.units import human_size

TOP = 10
MAX_TRACKED = 10000
# A viewer's filtered list is kept for the page's own refresh interval: filtering walks
# every tracked name through the pull policy until `n` pass, all of them for a viewer who
# may see few (an anonymous one), which no page view should pay for again and again.
REFRESH_SECONDS = 10
# How often a worker publishes its pulls for the others' pages (when they changed).
PUBLISH_SECONDS = 5.0
VIEWS_KEPT = 256

Ranking = list[tuple[str, int]]
# A sample's value by its name and sorted labels.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# The series the page shows.
SHOWN = {
    "mirror_cache_requests_total", "mirror_served_bytes_total", "mirror_cache_size_bytes",
    "mirror_upstream_fetches_in_flight", "mirror_storage_writable", "mirror_metadata_up",
    "mirror_s3_up", "mirror_upstream_ratelimit_remaining", "mirror_upstream_up",
}  # fmt: skip


class PullCounter:
    """Manifest pulls per repository, bounded: the quiet ones are forgotten first. With
    workers (`shared`: the directory of their files), the page adds the other workers'
    published counts (observe/workerfiles.py) to this one's."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, shared: Path | None = None
    ) -> None:
        self._counts: Counter[str] = Counter()
        self._clock = clock
        self._views: LRU[tuple[str, int], tuple[float, Ranking]] = LRU(VIEWS_KEPT)
        self.shared = shared
        self._others: Counter[str] = Counter()  # as last read (`refresh`, in a thread)
        self._changes = 0
        self._published = 0

    def add(self, repository: str) -> None:
        self._counts[repository] += 1
        self._changes += 1
        if len(self._counts) > MAX_TRACKED:
            self._counts = Counter(dict(self._counts.most_common(MAX_TRACKED // 2)))

    def changed(self) -> dict[str, int] | None:
        """A copy of the counts to publish, when they changed since the last one."""
        if self._changes == self._published:
            return None
        self._published = self._changes
        return dict(self._counts)

    def refresh(self) -> None:
        """Read the other workers' counts (blocking; with workers only)."""
        if self.shared is not None:
            self._others = others_pulls(self.shared)

    def _every_workers(self) -> Counter[str]:
        return self._counts + self._others if self._others else self._counts

    def top(
        self, n: int = TOP, shown: Callable[[str], bool] | None = None, viewer: str = ""
    ) -> Ranking:
        """The `n` most pulled repositories; with `shown`, the `n` most pulled of those it
        lets through, as found for `viewer` (whom `shown` stands for) within the last
        refresh interval."""
        if shown is None:
            return self._every_workers().most_common(n)
        now = self._clock()
        kept = self._views.get((viewer, n))
        if kept is not None and now - kept[0] < REFRESH_SECONDS:
            return kept[1]
        ranked = self._every_workers().most_common()
        found = list(islice((entry for entry in ranked if shown(entry[0])), n))
        self._views.put((viewer, n), (now, found))
        return found


def samples(metrics: Metrics) -> Samples:
    """The values the page shows, from what /metrics serves: with workers, every worker's
    (one worker's own would differ from page to page). Blocking: with workers it reads
    their files."""
    # Filtered here: a restricted registry sees nothing of the workers' collector, which
    # names no series before it collects.
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.exposed.collect()
        for sample in family.samples
        if sample.name in SHOWN
    }


def _sample(values: Samples, name: str, **labels: str) -> float | None:
    return values.get((name, tuple(sorted(labels.items()))))


def _value(values: Samples, name: str, **labels: str) -> float:
    return _sample(values, name, **labels) or 0.0


def _ratio(hits: float, misses: float) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "–"


def _rows(cells: list[list[str]]) -> str:
    return "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in cells
    )


def _no_top(pulls: PullCounter) -> str:
    return "(none to show)" if pulls.top(1) else "(no pulls yet)"


def _upstream_rows(upstreams: Upstreams, values: Samples) -> list[list[str]]:
    rows = []
    for upstream in upstreams:
        # As /metrics says it (with workers, any worker's open circuit), not this worker's
        # own circuit: a page would say "up" or "failing" by which worker answered it.
        up = _sample(values, "mirror_upstream_up", upstream=upstream.name)
        failing = upstream.breaker.is_open if up is None else up < 1
        health = "failing" if failing else "up"
        remaining = _sample(values, "mirror_upstream_ratelimit_remaining", upstream=upstream.name)
        budget = "–" if remaining is None else f"{int(remaining)}"
        default = " (default)" if upstream is upstreams.default else ""
        rows.append([upstream.name + default, upstream.url, health, budget])
    return rows


def render(
    config: Config,
    upstreams: Upstreams,
    values: Samples,
    pulls: PullCounter,
    shown: Callable[[str], bool] | None = None,
    viewer: str = "",
) -> str:
    """The page from the metrics' `values` (`samples`); `shown` says which repository
    names it may hold (None: every one), for `viewer` (the subject it stands for: ""
    anonymous)."""

    def hits(kind: str) -> str:
        return _ratio(
            _value(values, "mirror_cache_requests_total", kind=kind, result="hit"),
            _value(values, "mirror_cache_requests_total", kind=kind, result="miss"),
        )

    from_cache = _value(values, "mirror_served_bytes_total", source="cache")
    from_upstream = _value(values, "mirror_served_bytes_total", source="upstream")
    bound = config.storage.max_size
    summary = [
        ["Blob hit ratio (requests)", hits("blob")],
        ["Tag hit ratio (requests)", hits("tag")],
        ["Hit ratio (bytes)", _ratio(from_cache, from_upstream)],
        ["Served from cache", human_size(from_cache)],
        ["Served from upstream", human_size(from_upstream)],
        ["Cache size", human_size(_value(values, "mirror_cache_size_bytes"))
         + (f" of {human_size(bound)}" if bound else " (unbounded)")],
        ["Downloads in flight", f"{int(_value(values, 'mirror_upstream_fetches_in_flight'))}"],
        ["Storage writable", "yes" if _value(values, "mirror_storage_writable") else "NO"],
        ["Metadata store", "up" if _value(values, "mirror_metadata_up") else "DOWN (in-process)"],
    ]  # fmt: skip
    if config.storage.s3 is not None:
        bucket_up = _value(values, "mirror_s3_up")
        summary.append(["S3 bucket", "up" if bucket_up else "DOWN (serving uncached)"])
    ranking = pulls.top(TOP, shown, viewer)
    top = [[name, str(count)] for name, count in ranking] or [[_no_top(pulls), ""]]
    return PAGE.format(
        upstreams=_rows(_upstream_rows(upstreams, values)),
        summary=_rows(summary),
        top=_rows(top),
        top_note=EVERY_WORKER.format(PUBLISH_SECONDS) if config.workers > 1 else "",
    )


EVERY_WORKER = "<p>Pulls of every worker, each one's counted up to {:.0f} s ago.</p>\n"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>mirror status</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; min-width: 32em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: left; }}
th {{ background: #f4f4f4; }}
</style></head><body>
<h1>mirror</h1>
<h2>Upstreams</h2>
<table><tr><th>registry</th><th>url</th><th>health</th><th>pulls left</th></tr>{upstreams}</table>
<h2>Cache</h2>
<table>{summary}</table>
<h2>Top repositories</h2>
<table><tr><th>repository</th><th>manifest pulls</th></tr>{top}</table>
{top_note}<p><a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></p>
</body></html>
"""
