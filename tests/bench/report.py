"""The results as a table of targets: printed, and written as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tests.bench.clients import WrkResult
from tests.bench.cpu import Used, median_used, shown
from tests.bench.freshwrite import side as fresh_side
from tests.bench.measure import (
    FRAMEWORK,
    LOADGEN_GET,
    LOADGEN_HEAD,
    NGINX_FILE,
    Cold,
    ManifestRuns,
    WarmBlob,
)
from tests.bench.mirrorconfig import POLICY_SUMMARY, PRODUCTION

MIB = 1024 * 1024
RSS_LIMIT_MIB = 256
P99_LIMIT_MS = 20.0
# Manifest GET by tag, 1 worker, against the peer (distribution's proxy): issue #18.
TAG_VS_PEER = 30.0
TAG_P99_LIMIT_MS = 10.0
Compare = Literal["le", "lt", "ge", "eq"]
SIGN = {"le": "≤", "lt": "<", "ge": "≥", "eq": "="}
# "reference": what the ratio divides by, as the target names it (nginx, the peer, one
# direct fetch, a direct S3 GET, 1 worker, ...) or the limit itself.
HEADERS = ("metric", "mirror", "peer", "reference", "ratio", "target", "met?",
           "CPU s per process (median of runs)")  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One target: the figures, mirror / reference as `ratio`, and whether it holds."""

    metric: str
    unit: str
    mirror: float | None
    peer: float | None
    reference: float | None  # what the ratio divides by: a server's figure, or the limit
    ratio: float | None
    compare: Compare
    threshold: float  # what the ratio is held to
    target: str
    # side of the comparison ("mirror", "nginx", ...) -> process -> median CPU seconds
    cpu: dict[str, Used] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        r, t = self.ratio, self.threshold
        return {"le": r <= t, "lt": r < t, "ge": r >= t, "eq": r == t}[self.compare]

    def cells(self) -> tuple[str, ...]:
        met = {True: "yes", False: "NO", None: "–"}[self.met]
        ratio = "–" if self.ratio is None else f"{self.ratio:.2f}×"
        values = (fmt(v, self.unit) for v in (self.mirror, self.peer, self.reference))
        cpu = "; ".join(f"{side}: {shown(used)}" for side, used in self.cpu.items()) or "–"
        return (f"{self.metric} ({self.unit})", *values, ratio, self.target, met, cpu)


def limit_row(metric: str, unit: str, value: float, limit: float, target: str) -> Row:
    """A figure held to a fixed limit: the limit is its reference."""
    return Row(metric, unit, value, None, limit, value / limit, "lt", 1.0, target)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("req/s", "MiB", "fetches", "req"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.1f}"
    return f"{value:.3f}"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# --- rows -----------------------------------------------------------------------------------


def warm_rows(warm: WarmBlob, size_mib: int) -> list[Row]:
    m, p, n = (median(warm.seconds[k]) for k in ("mirror", "peer", "nginx"))
    cpu = {side: median_used(warm.cpu[side]) for side in ("mirror", "peer", "nginx")}
    name = f"warm blob GET {size_mib} MiB"
    return [
        Row(name, "s", m, p, n, ratio(m, n), "le", 1.25, "≤ 1.25× nginx",
            {k: cpu[k] for k in ("mirror", "nginx")}),
        Row(f"{name}, vs peer", "s", m, p, p, ratio(m, p), "le", 1.0, "≤ 1× peer",
            {k: cpu[k] for k in ("mirror", "peer")}),
    ]  # fmt: skip


def _wrk_median(runs: list[WrkResult]) -> tuple[float, float]:
    return median([r.rps for r in runs]), median([r.p99_ms for r in runs])


def manifest_rows(man: ManifestRuns) -> list[Row]:
    get_rps, get_p99 = _wrk_median(man.results["mirror GET tag"])
    peer_rps, peer_p99 = _wrk_median(man.results["peer GET tag"])
    cpu = {side: median_used(man.cpu[label]) for side, label in
           (("mirror", "mirror GET tag"), ("peer", "peer GET tag"))}  # fmt: skip
    name = f"manifest GET by tag, 1 worker, {PRODUCTION}"
    rows = [
        Row(name, "req/s", get_rps, peer_rps, peer_rps, ratio(get_rps, peer_rps), "ge",
            TAG_VS_PEER, f"≥ {TAG_VS_PEER:.0f}× peer", cpu),
        replace(limit_row(f"{name}, p99", "ms", get_p99, TAG_P99_LIMIT_MS,
                          f"< {TAG_P99_LIMIT_MS:.0f} ms"), peer=peer_p99),
    ]  # fmt: skip
    head_rps, head_p99 = _wrk_median(man.results[LOADGEN_HEAD])
    lg_rps, _ = _wrk_median(man.results[LOADGEN_GET])
    digest_rps, digest_p99 = _wrk_median(man.results["mirror GET digest"])
    limit = f"< {P99_LIMIT_MS:.0f} ms"
    rows += [
        Row("manifest HEAD by tag [loadgen]", "req/s", head_rps, None, lg_rps,
            ratio(head_rps, lg_rps), "ge", 0.95, "≥ GET by tag [loadgen] −5 %",
            {"mirror": median_used(man.cpu[LOADGEN_HEAD])}),
        limit_row("manifest HEAD by tag p99 [loadgen]", "ms", head_p99, P99_LIMIT_MS, limit),
        Row("manifest GET by digest", "req/s", digest_rps, None, get_rps,
            ratio(digest_rps, get_rps), "ge", 0.95, "≥ GET by tag −5 %",
            {"mirror": median_used(man.cpu["mirror GET digest"])}),
        limit_row("manifest GET by digest p99", "ms", digest_p99, P99_LIMIT_MS, limit),
    ]  # fmt: skip
    return rows + floor_rows(man, get_rps, cpu["mirror"])


def floor_rows(man: ManifestRuns, get_rps: float, mirror_cpu: Used) -> list[Row]:
    """The manifest by tag beside the same answer without the mirror: what one core gives
    for it as a file from nginx, and from aiohttp alone (no target: shown, not held)."""
    rows = []
    for label, what in (
        (NGINX_FILE, "the same bytes as a file from nginx, 1 worker"),
        (FRAMEWORK, "aiohttp alone: one route, the same answer and headers"),
    ):
        if label not in man.results:
            continue
        rps, _ = _wrk_median(man.results[label])
        rows.append(
            Row(
                f"manifest GET by tag, 1 worker, beside {what}",
                "req/s",
                get_rps,
                None,
                rps,
                None,
                "ge",
                0.0,
                "shown",
                {"mirror": mirror_cpu, label: median_used(man.cpu[label])},
            )
        )
    return rows


def cold_rows(cold: Cold, clients: int, size_mib: int) -> list[Row]:
    def runs(target: str) -> list[Any]:
        return [run for run in cold.runs if run.target == target]

    fetches = {t: float(max(r.upstream_fetches for r in runs(t))) for t in ("mirror", "peer")}
    walls = {t: median([r.wall for r in runs(t)]) for t in ("mirror", "peer")}
    direct = median(cold.direct)
    cpu = {t: median_used([r.cpu for r in runs(t)]) for t in ("mirror", "peer")}
    cpu["direct fetch"] = median_used(cold.direct_cpu)
    if cold.fresh:
        cpu[fresh_side(size_mib, median(cold.fresh))] = median_used(cold.fresh_cpu)
    return [
        Row(f"cold {clients}× GET: upstream fetches, worst run", "fetches", fetches["mirror"],
            fetches["peer"], 1.0, fetches["mirror"], "eq", 1.0, "exactly 1"),
        Row(f"cold {clients}× GET: all done", "s", walls["mirror"], walls["peer"], direct,
            ratio(walls["mirror"], direct), "le", 3.0, "≤ 3× one direct fetch", cpu),
    ]  # fmt: skip


def memory_rows(max_bytes: int, final_bytes: int) -> list[Row]:
    return [
        limit_row(f"mirror RSS, {name}", "MiB", value / MIB, RSS_LIMIT_MIB,
                  f"< {RSS_LIMIT_MIB} MiB")
        for name, value in (("max", max_bytes), ("final", final_bytes))
    ]  # fmt: skip


def docker_rows(seconds: dict[str, list[float]]) -> list[Row]:
    m, p = median(seconds["mirror"]), median(seconds["peer"])
    return [Row("warm docker pull, 20 layers", "s", m, p, p, ratio(m, p), "lt", 1.0, "< peer")]


NOTES = [
    "[loadgen]: wrk cannot send HEAD (it waits for the body that a HEAD's Content-Length "
    "announces: wg/wrk#198), so HEAD is measured with tests/bench/loadgen.py, a heavier "
    "client, and held to GET by tag measured by that same client in the same rounds.",
    "−5 %: run-to-run noise allowed where the mirror is compared with itself.",
    "ratio: mirror ÷ reference, the figure the target names (nginx, the peer, one direct "
    "fetch, …) or the limit itself; met? compares it with the target.",
    "CPU s: per side of the comparison (the mirror's runs, the reference's), the CPU seconds "
    "each process used during the timed part, median of the runs: servers from /proc, the "
    "clients (curl, wrk, loadgen) as the bench reaped them.",
    f"every bench mirror runs with the audit line (always on) and a pull policy "
    f"({POLICY_SUMMARY}), as a production config would.",
]


def upstream_notes(raw: dict[str, Any]) -> list[str]:
    """What the upstream saw during the timed parts: evidence for 'cached' and 'warm'."""
    notes = []
    if (warm := raw.get("warm blob")) is not None:
        notes.append(f"warm blob: {warm.upstream_fetches} upstream fetches during the timed GETs")
    if (man := raw.get("manifests")) is not None:
        per_run = ", ".join(f"{label} {max(n)}" for label, n in man.upstream.items())
        notes.append(f"upstream manifest requests in the busiest wrk run: {per_run}")
    if (pulls := raw.get("docker pull")) is not None:
        for target, stats in pulls.upstream.items():
            notes.append(f"docker pull via {target}, upstream per timed pull: {stats}")
    return notes


# --- output ---------------------------------------------------------------------------------


def text_table(rows: list[Row]) -> str:
    """Columns aligned; the CPU column, last and of any length, left as it is."""
    table = [HEADERS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        first, *middle, last = cells
        parts = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(middle, widths[1:], strict=True)
        ]
        return "  ".join([*parts, last])

    rule = "  ".join("-" * w for w in [*widths, len(HEADERS[-1])])
    return "\n".join([line(table[0]), rule, *(line(cells) for cells in table[1:])])


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, summary: dict[str, Any], rows: list[Row], raw: dict[str, Any]) -> None:
    data = {
        **summary,
        "rows": [{**asdict(row), "met": row.met} for row in rows],
        "raw": raw,
    }
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: object) -> object:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[call-overload]
    raise TypeError(f"not JSON: {type(obj).__name__}")


def write_markdown(path: Path, summary: dict[str, Any], rows: list[Row]) -> None:
    notes = "\n".join(
        f"- {key}:" + "".join(f"\n  - {v}" for v in value)
        if isinstance(value, list)
        else f"- {key}: {value}"
        for key, value in summary.items()
    )
    path.write_text(f"# mirror bench\n\n{markdown_table(rows)}\n\n{notes}\n")
