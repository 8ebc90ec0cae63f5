"""What a sweep found: each job's ``result.json``, and at the end of a multirun ``summary.csv``, ``summary.md`` and
``summary.png`` in the sweep folder, best job first.

Sweepers reuse it: ``rows = collect_rows(sweep_dir)``, add their own columns to the rows (``state``, a trial
number, ...), then ``write_summary(sweep_dir, rows)``; the multirun's own summary (:class:`SweepSummary`) is then
left as they wrote it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from charlstm.app.rundir import fixed_keys, swept_overrides
from charlstm.app.sweepdir import earlier_jobs, hold, release
from charlstm.core.errors import exit_on_error
from charlstm.core.fileio import atomic_write_text

RESULT = "result.json"
COMPLETE, FAILED, INTERRUPTED, PRUNED, MISSING = "complete", "failed", "interrupted", "pruned", "no result"
# States that make a sweep command exit non-zero
FAILURES = (FAILED, INTERRUPTED, MISSING)
# Row keys in the order the tables show them; a row's other scalar keys follow (a sweeper's extra columns)
COLUMNS = ("job", "state", "overrides", "val/bpc_best", "val/bpc", "steps", "train_seconds", "folder", "error")
_NOT_COLUMNS = ("params", "history", "metrics", "run_dir")

# Sweep folders summarized by this process (a sweeper that writes its own summary keeps it)
_written: dict[Path, list[dict[str, Any]]] = {}
# The states that fail the command, as the sweeper that wrote a summary chose them
_failures: dict[Path, tuple[str, ...]] = {}


# -- one job's result --------------------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_result(folder: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write ``result.json`` into a run folder (atomically: a reader sees the old file or the new one).

    Keys: ``job``, ``state`` (complete / failed / interrupted / pruned), ``overrides`` (the job's swept
    overrides), ``params`` ({swept key: value}), ``metrics`` ({"val/bpc_best": ..., ...}), ``steps``,
    ``train_seconds``, ``run_dir`` (where checkpoints went), ``history`` ([[step, val/bpc], ...]), ``error``.
    """

    path = Path(folder) / RESULT
    text = json.dumps(_finite(result), indent=1, ensure_ascii=False, default=str) + "\n"
    atomic_write_text(path, text)
    return path


def read_result(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run folder's ``result.json``, or None when it has none (still running, or killed) or it is unreadable."""
    try:
        result = json.loads((Path(folder) / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


# -- rows ------------------------------------------------------------------------------------------------------
def _job_number(folder: Path, result: dict[str, Any] | None) -> int | None:
    if result is not None and isinstance(result.get("job"), int):
        return result["job"]
    m = re.match(r"(\d+)(?:_|$)", folder.name)
    return int(m.group(1)) if m else None


def _hydra_overrides(folder: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    except (OSError, ValueError, TypeError):
        return []


def row_of(folder: Path, sweep_dir: Path, fixed: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The summary row of one job folder (None when it is not a job folder)."""
    result = read_result(folder)
    if result is None and not (folder / ".hydra").is_dir():
        return None
    job = _job_number(folder, result)
    name = folder.relative_to(sweep_dir).as_posix() if folder.is_relative_to(sweep_dir) else str(folder)
    if result is None:
        overrides = swept_overrides(_hydra_overrides(folder), fixed)
        error = f"no {RESULT}: the job was killed or is still running"
        return {"job": job, "state": MISSING, "overrides": " ".join(overrides), "folder": name, "error": error,
                "params": {}, "history": []}  # fmt: skip
    metrics = result.get("metrics") or {}
    row: dict[str, Any] = {
        "job": job,
        "state": result.get("state") or COMPLETE,
        "overrides": " ".join(result.get("overrides") or []),
        "val/bpc_best": metrics.get("val/bpc_best"),
        "val/bpc": metrics.get("val/bpc"),
        "steps": result.get("steps"),
        "train_seconds": result.get("train_seconds"),
        "folder": name,
        "error": result.get("error"),
        "params": dict(result.get("params") or {}),
        "history": [tuple(p) for p in result.get("history") or [] if isinstance(p, list | tuple) and len(p) == 2],
        "run_dir": result.get("run_dir"),
    }
    row["metrics"] = dict(metrics)  # every final metric, e.g. for write_summary(metric="val/loss")
    return row


def _fixed_keys_of(sweep_dir: Path) -> list[str] | None:
    """The keys the sweep's command line fixed, from Hydra's ``multirun.yaml`` in the sweep folder."""
    try:
        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
    except Exception:  # no or an unreadable multirun.yaml: swept_overrides falls back to its default
        return None
    return fixed_keys([str(o) for o in task])


def collect_rows(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per job folder directly under ``sweep_dir`` (one holding ``result.json`` or Hydra's ``.hydra``),
    in job order. A job without ``result.json`` (killed, or still running) is a row in state ``no result``."""
    sweep_dir = Path(sweep_dir)
    fixed = _fixed_keys_of(sweep_dir)
    rows = [row for p in sorted(sweep_dir.iterdir()) if p.is_dir() and (row := row_of(p, sweep_dir, fixed))]
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["folder"]))


def value_of(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, else the row's final metric of that name (rows from :func:`collect_rows` keep them all)."""
    if key in row:
        return row[key]
    return (row.get("metrics") or {}).get(key)


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, text, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def rank_rows(rows: Sequence[dict[str, Any]], metric: str = "val/bpc_best", direction: str = "minimize"):
    """The rows best first by ``metric``; rows without it (failed, pruned early, no result) last, in job order."""
    sign = -1.0 if direction.startswith("max") else 1.0
    scored = [r for r in rows if as_number(value_of(r, metric)) is not None]
    rest = [r for r in rows if as_number(value_of(r, metric)) is None]
    return sorted(scored, key=lambda r: sign * as_number(value_of(r, metric))) + rest


def columns_of(rows: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """The table's columns: the standard ones (the sort metric after the state), then any other scalar keys."""
    cols = list(COLUMNS)
    if metric not in cols:
        cols.insert(cols.index("state") + 1, metric)
    for row in rows:
        for key, value in row.items():
            if key not in cols and key not in _NOT_COLUMNS and not isinstance(value, dict | list | tuple):
                cols.append(key)
    return cols


def _cell(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if key == "train_seconds" else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], metric: str = "val/bpc_best") -> str:
    """The ranked rows as a Markdown table (a ``rank`` column first; ``state`` and ``error`` only when some
    job did not complete)."""
    cols = columns_of(rows, metric)
    if all(r.get("state", COMPLETE) == COMPLETE for r in rows):
        cols = [c for c in cols if c not in ("state", "error")]
    names = {"train_seconds": "time (s)"}
    head = ["rank", *(names.get(c, c) for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, row in enumerate(rows, 1):
        cells = [str(i), *(_cell(value_of(row, c), c).replace("|", "\\|").replace("\n", " ") for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    sweep_dir: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    metric: str = "val/bpc_best",
    direction: str = "minimize",
    plot: bool = True,
    failures: Sequence[str] = FAILURES,
) -> Path:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``, best row first by ``metric``;
    returns the path of ``summary.md``.

    A row is a dict with the keys of :data:`COLUMNS` (any may be missing) plus, optionally, ``params`` ({swept
    key: value}, one chart panel each) and ``history`` ([(step, val/bpc), ...], the validation curves); other
    scalar keys become extra columns. ``failures``: the row states that make the command exit non-zero once the
    multirun ends (a search, whose failed trials are results, passes none).
    """

    sweep_dir = Path(sweep_dir)
    ranked = rank_rows(rows, metric, direction)
    cols = columns_of(ranked, metric)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", *cols])
    for i, row in enumerate(ranked, 1):
        writer.writerow([i, *("" if value_of(row, c) is None else value_of(row, c) for c in cols)])
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())
    done = sum(r.get("state", COMPLETE) == COMPLETE for r in ranked)
    heading = f"# Sweep summary: {sweep_dir.name}\n\n{done} of {len(ranked)} jobs complete, best {metric} first.\n\n"
    md = heading + markdown_table(ranked, metric) + "\n"
    atomic_write_text(sweep_dir / "summary.md", md)
    if plot:
        plot_summary(sweep_dir / "summary.png", ranked, metric, direction)
    _written[sweep_dir.resolve()] = list(ranked)
    _failures[sweep_dir.resolve()] = tuple(failures)
    return sweep_dir / "summary.md"


# -- the end of a multirun -------------------------------------------------------------------------------------
def summarize(sweep_dir: str | os.PathLike[str], metric: str = "val/bpc_best", direction: str = "minimize"):
    """Collect the rows of ``sweep_dir``, write the summary files and print the table; returns the ranked rows."""
    sweep_dir = Path(sweep_dir)
    earlier = earlier_jobs(sweep_dir)  # an earlier sweep's jobs in the same folder are not this one's
    rows = [row for row in collect_rows(sweep_dir) if row["folder"] not in earlier]
    md = write_summary(sweep_dir, rows, metric, direction)
    ranked = _written[sweep_dir.resolve()]
    jobs = f"{len(ranked)} job" + ("" if len(ranked) == 1 else "s")
    print("\n".join(console_lines(f"sweep summary ({jobs}, best {metric} first):", ranked, metric, md)), flush=True)
    return ranked


def console_lines(heading: str, ranked: Sequence[dict[str, Any]], metric: str, md: Path) -> list[str]:
    """What a finished sweep or search prints: its heading, the ranked table and where its files are."""
    return ["\n" + heading, markdown_table(ranked, metric), f"summary:      {md}  (also summary.csv, summary.png)",
            f"tensorboard:  tensorboard --logdir {md.parent}"]  # fmt: skip


def failures_line(rows: Sequence[dict[str, Any]], sweep_dir: Path, failures: Sequence[str] = FAILURES) -> str | None:
    """The one line a sweep with failed jobs ends with (None when every job completed or was pruned)."""
    bad = [r for r in rows if r.get("state") in failures]
    if not bad:
        return None
    jobs = ", ".join(str(r.get("job")) for r in bad[:10]) + (" ..." if len(bad) > 10 else "")
    return (
        f"{len(bad)} of {len(rows)} sweep jobs did not complete (job {jobs}); their errors are in "
        f"{sweep_dir / 'summary.md'}"
    )


class SweepSummary(Callback):
    """Hydra callback: a multirun holds its sweep folder while it runs (a second sweep there is refused); when it
    ends, write and print its summary of its own jobs (unless its sweeper already wrote one), then exit with status
    1 when a job failed."""

    def __init__(self, metric: str = "val/bpc_best", direction: str = "minimize") -> None:
        self.metric = metric or "val/bpc_best"
        self.direction = direction
        self.sweep_dir: Path | None = None

    @exit_on_error  # Hydra turns an exception raised by a callback into a warning and goes on
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        if OmegaConf.select(config, "hydra.sweeper.study_name") is None:
            # A search's folder is shared by its study's workers (Optuna gives each trial its own number, and the
            # search summary is the study's); any other sweep holds its folder alone.
            hold(self.sweep_dir)
        _written.pop(self.sweep_dir.resolve(), None)  # a summary this process wrote there before is another sweep's
        _failures.pop(self.sweep_dir.resolve(), None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            release(sweep_dir)
            return
        try:
            rows = _written.get(sweep_dir.resolve())
            if rows is None:
                rows = summarize(sweep_dir, self.metric, self.direction)
        finally:
            release(sweep_dir)
        line = failures_line(rows, sweep_dir, _failures.get(sweep_dir.resolve(), FAILURES))
        if line is not None:
            print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(1)


# -- summary.png ----------------------------------------------------------------------------------------------------


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
