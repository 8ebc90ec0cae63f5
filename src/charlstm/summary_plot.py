"""``summary.png`` of a sweep: every job's validation curve on one chart, and the metric against each swept key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from charlstm.summary import as_number, rank_rows, value_of


def _label(row: dict[str, Any], limit: int = 48) -> str:
    text = f"{row.get('job')}: {row.get('overrides') or '(no overrides)'}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_summary(path: Path, rows: Sequence[dict[str, Any]], metric: str, direction: str = "minimize") -> Path:
    """``summary.png``: every job's validation curve on one chart, and below it ``metric`` against each swept
    key (one panel per key; the best job marked). Drawn with matplotlib's Agg canvas, no display needed."""
    from matplotlib.figure import Figure

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.get("params") or {} if k not in keys]
    scored = [r for r in rows if as_number(value_of(r, metric)) is not None]
    best = rank_rows(scored, metric, direction)[0] if scored else None
    width = max(9.0, 3.2 * len(keys))
    fig = Figure(figsize=(width, 8.5 if keys else 5.0), layout="constrained")
    grid = fig.add_gridspec(2 if keys else 1, max(1, len(keys)), height_ratios=[3, 2] if keys else [1])
    ax = fig.add_subplot(grid[0, :])
    curves = [r for r in rows if r.get("history")]
    for row in curves:
        steps, values = zip(*row["history"], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=_label(row),
                linewidth=2.2 if row is best else 1.2)  # fmt: skip
    ax.set_title("validation bits/char of every job")
    ax.set_xlabel("step")
    ax.set_ylabel("val/bpc")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small", ncol=1 if len(curves) <= 12 else 2, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no validation curves", ha="center", va="center", transform=ax.transAxes)
    for i, key in enumerate(keys):
        pax = fig.add_subplot(grid[1, i])
        points = [(r["params"][key], as_number(value_of(r, metric)), r is best)
                  for r in scored if key in r.get("params", {})]  # fmt: skip
        xs = [p[0] for p in points]
        if xs and all(as_number(x) is not None for x in xs):
            positions = [float(x) for x in xs]
            if min(positions) > 0 and max(positions) / min(positions) >= 10:
                pax.set_xscale("log")
            values = sorted(set(positions))
            if len(values) <= 8:  # the swept values themselves as ticks
                pax.set_xticks(values, [f"{v:g}" for v in values], fontsize="small")
                pax.minorticks_off()
        else:  # text values (a config group choice, a path): one position each, in order of appearance
            labels = list(dict.fromkeys(str(x) for x in xs))
            positions = [labels.index(str(x)) for x in xs]
            pax.set_xticks(range(len(labels)), [s if len(s) <= 14 else s[:13] + "…" for s in labels],
                           rotation=30, fontsize="small")  # fmt: skip
        pax.scatter(positions, [p[1] for p in points], s=24)
        marked = [(x, p[1]) for x, p in zip(positions, points, strict=True) if p[2]]
        if marked:
            pax.scatter(*zip(*marked, strict=True), s=90, marker="*", color="tab:red", label="best", zorder=3)
        pax.set_xlabel(key)
        pax.set_ylabel(metric if i == 0 else "")
        pax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path
