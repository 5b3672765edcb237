"""The results as a table of targets: printed, and written as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tests.bench.clients import WrkResult
from tests.bench.measure import LOADGEN_GET, LOADGEN_HEAD, Cold, ManifestRuns, WarmBlob

MIB = 1024 * 1024
RSS_LIMIT_MIB = 256
P99_LIMIT_MS = 20.0
Compare = Literal["le", "lt", "ge", "eq"]
SIGN = {"le": "≤", "lt": "<", "ge": "≥", "eq": "="}
# "reference": nginx, or for the S3 rows what the target names (a direct S3 GET, the
# filesystem backend).
HEADERS = ("metric", "mirror", "peer", "reference", "ratio", "target", "met?")


@dataclass(frozen=True)
class Row:
    """One target: the figures, mirror / reference as `ratio`, and whether it holds."""

    metric: str
    unit: str
    mirror: float | None
    peer: float | None
    nginx: float | None
    ratio: float | None
    compare: Compare
    threshold: float  # what the ratio is held to
    target: str

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        r, t = self.ratio, self.threshold
        return {"le": r <= t, "lt": r < t, "ge": r >= t, "eq": r == t}[self.compare]

    def cells(self) -> tuple[str, ...]:
        met = {True: "yes", False: "NO", None: "–"}[self.met]
        ratio = "–" if self.ratio is None else f"{self.ratio:.2f}×"
        values = (fmt(v, self.unit) for v in (self.mirror, self.peer, self.nginx))
        return (f"{self.metric} ({self.unit})", *values, ratio, self.target, met)


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
    name = f"warm blob GET {size_mib} MiB"
    return [
        Row(name, "s", m, p, n, ratio(m, n), "le", 1.25, "≤ 1.25× nginx"),
        Row(f"{name}, vs peer", "s", m, p, None, ratio(m, p), "le", 1.0, "≤ 1× peer"),
    ]


def _wrk_median(runs: list[WrkResult]) -> tuple[float, float]:
    return median([r.rps for r in runs]), median([r.p99_ms for r in runs])


def manifest_rows(man: ManifestRuns) -> list[Row]:
    get_rps, get_p99 = _wrk_median(man.results["mirror GET tag"])
    peer_rps, peer_p99 = _wrk_median(man.results["peer GET tag"])
    rows = [
        Row("manifest GET by tag", "req/s", get_rps, peer_rps, None, ratio(get_rps, peer_rps),
            "ge", 10.0, "≥ 10× peer"),
        Row("manifest GET by tag p99", "ms", get_p99, peer_p99, None,
            ratio(get_p99, P99_LIMIT_MS), "lt", 1.0, f"< {P99_LIMIT_MS:.0f} ms"),
    ]  # fmt: skip
    head_rps, head_p99 = _wrk_median(man.results[LOADGEN_HEAD])
    lg_rps, _ = _wrk_median(man.results[LOADGEN_GET])
    digest_rps, digest_p99 = _wrk_median(man.results["mirror GET digest"])
    rows += [
        Row("manifest HEAD by tag [loadgen]", "req/s", head_rps, None, None,
            ratio(head_rps, lg_rps), "ge", 0.95,
            f"≥ GET by tag [loadgen] −5 % ({lg_rps:,.0f})"),
        Row("manifest HEAD by tag p99 [loadgen]", "ms", head_p99, None, None,
            ratio(head_p99, P99_LIMIT_MS), "lt", 1.0, f"< {P99_LIMIT_MS:.0f} ms"),
        Row("manifest GET by digest", "req/s", digest_rps, None, None,
            ratio(digest_rps, get_rps), "ge", 0.95, "≥ GET by tag −5 %"),
        Row("manifest GET by digest p99", "ms", digest_p99, None, None,
            ratio(digest_p99, P99_LIMIT_MS), "lt", 1.0, f"< {P99_LIMIT_MS:.0f} ms"),
    ]  # fmt: skip
    return rows


def cold_rows(cold: Cold, clients: int) -> list[Row]:
    def runs(target: str) -> list[Any]:
        return [run for run in cold.runs if run.target == target]

    fetches = {t: float(max(r.upstream_fetches for r in runs(t))) for t in ("mirror", "peer")}
    walls = {t: median([r.wall for r in runs(t)]) for t in ("mirror", "peer")}
    direct = median(cold.direct)
    return [
        Row(f"cold {clients}× GET: upstream fetches, worst run", "fetches", fetches["mirror"],
            fetches["peer"], None, fetches["mirror"], "eq", 1.0, "exactly 1"),
        Row(f"cold {clients}× GET: all done", "s", walls["mirror"], walls["peer"], None,
            ratio(walls["mirror"], direct), "le", 3.0, f"≤ 3× one direct fetch ({direct:.2f} s)"),
    ]  # fmt: skip


def memory_rows(max_bytes: int, final_bytes: int) -> list[Row]:
    rows = []
    for name, value in (("max", max_bytes), ("final", final_bytes)):
        mib = value / MIB
        rows.append(Row(f"mirror RSS, {name}", "MiB", mib, None, None, mib / RSS_LIMIT_MIB,
                        "lt", 1.0, f"< {RSS_LIMIT_MIB} MiB"))  # fmt: skip
    return rows


def docker_rows(seconds: dict[str, list[float]]) -> list[Row]:
    m, p = median(seconds["mirror"]), median(seconds["peer"])
    return [Row("warm docker pull, 20 layers", "s", m, p, None, ratio(m, p), "lt", 1.0, "< peer")]


NOTES = [
    "[loadgen]: wrk cannot send HEAD (it waits for the body that a HEAD's Content-Length "
    "announces: wg/wrk#198), so HEAD is measured with tests/bench/loadgen.py, a heavier "
    "client, and held to GET by tag measured by that same client in the same rounds.",
    "−5 %: run-to-run noise allowed where the mirror is compared with itself.",
    "ratio: mirror ÷ the reference named in the target (nginx, the peer, one direct fetch, "
    "or the limit itself); met? compares it with the target.",
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
    table = [HEADERS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]

    def line(cells: tuple[str, ...]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts)

    rule = "  ".join("-" * w for w in widths)
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
