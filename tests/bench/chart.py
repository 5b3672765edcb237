"""chart.png: each target's ratio against its threshold, and the mirror's memory over time."""

from __future__ import annotations

from pathlib import Path

from tests.bench.report import MIB, RSS_LIMIT_MIB, Row


def write_chart(path: Path, rows: list[Row], rss: list[tuple[float, int]]) -> str | None:
    """Draw the chart; a reason instead when matplotlib is missing (it is in the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    shown = [row for row in rows if row.ratio is not None and row.ratio > 0]
    fig, (bars, memory) = plt.subplots(
        2, 1, figsize=(10, 4 + 0.45 * len(shown)), height_ratios=[len(shown), 4]
    )
    y = list(range(len(shown)))[::-1]
    colors = ["tab:green" if row.met else "tab:red" for row in shown]
    bars.barh(y, [row.ratio or 0 for row in shown], color=colors, alpha=0.8)
    bars.scatter([row.threshold for row in shown], y, marker="|", s=400, color="black",
                 label="target")  # fmt: skip
    for yi, row in zip(y, shown, strict=True):
        bars.annotate(f" {row.ratio:.2f}× ({row.target})", (row.ratio or 0, yi), va="center",
                      fontsize=8)  # fmt: skip
    bars.set_yticks(y, [row.metric for row in shown], fontsize=8)
    bars.set_xscale("log")
    bars.set_xlabel("mirror ÷ reference (log scale); green: target met, red: missed")
    bars.legend(loc="lower right", fontsize=8)
    bars.set_title("mirror vs peer (distribution proxy) vs nginx")
    memory.plot([t for t, _ in rss], [b / MIB for _, b in rss], color="tab:blue")
    memory.axhline(RSS_LIMIT_MIB, color="tab:red", linestyle="--", label=f"{RSS_LIMIT_MIB} MiB")
    memory.set_xlabel("seconds since the mirror started")
    memory.set_ylabel("mirror RSS (MiB)")
    memory.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
