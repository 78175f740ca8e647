"""The sweep's tables: aggregation over seeds and tasks, and Markdown / CSV / PNG writers.

Rows are dicts; a metric ``m`` of a row is ``row[m]`` (mean) and ``row[m + "_std"]`` (std over seeds).

- :func:`per_task`: one row per (task, method): mean ± std over seeds.
- :func:`task_mean`: one row per method: for each seed the plain mean over tasks, then mean ± std over
  seeds (with one task: the per-task row).  (Pooling each method's samples over the tasks is the
  other aggregation: :mod:`kindjax.evaluation.pooled`.)
"""
from __future__ import annotations

import csv
import io
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from kindjax.evaluation.metrics import METRICS

#: (key, header, format) of a table column.
Column = tuple[str, str, str]


def scored_metrics(scores: Mapping[str, Mapping]) -> tuple[str, ...]:
    """The registered metrics (:mod:`kindjax.evaluation.metrics`) every score of ``scores`` holds, in the
    order of the first: the chosen metrics of the runs (``eval.metrics``), the tables' metric columns."""
    every = list(scores.values())
    return tuple(k for k in (every[0] if every else ()) if k in METRICS and all(k in s for s in every))


def metric_columns(names: Sequence[str]) -> list[Column]:
    """The table column of each metric of ``names``: its key, its header with ↑/↓, its format."""
    return [METRICS[n].column for n in names]


def group(runs, scores: dict[str, dict], by: Sequence[str]) -> dict[tuple, list[tuple]]:
    """``labels[by] → [(run, scores)]`` in grid order."""
    out: dict[tuple, list[tuple]] = {}
    for r in runs:
        out.setdefault(tuple(r.labels[k] for k in by), []).append((r, scores[r.workdir]))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std())


def per_task(runs, scores: dict[str, dict], metrics: Sequence[str]) -> list[dict]:
    """One row per (task, method): each metric's mean and std over the seeds."""
    rows = []
    for (task, method), members in group(runs, scores, ("task", "method")).items():
        row = dict(task=task, method=method, seeds=len(members))
        for m in metrics:
            row[m], row[m + "_std"] = mean_std([s[m] for _, s in members])
        rows.append(row)
    return rows


def task_mean(runs, scores: dict[str, dict], metrics: Sequence[str]) -> list[dict]:
    """One row per method: per seed the plain mean over its tasks, then mean ± std over seeds."""
    rows = []
    for (method,), members in group(runs, scores, ("method",)).items():
        by_seed: dict[int, list[dict]] = {}
        for r, s in members:
            by_seed.setdefault(r.labels["seed"], []).append(s)
        row = dict(method=method, seeds=len(by_seed), tasks=len({r.labels["task"] for r, _ in members}))
        for m in metrics:
            row[m], row[m + "_std"] = mean_std([np.mean([s[m] for s in per_seed]) for per_seed in by_seed.values()])
        rows.append(row)
    return rows


def cell(row: dict, key: str, fmt: str) -> str:
    value = row[key]
    if isinstance(value, str):
        return value
    text = format(value, fmt)
    if key + "_std" in row and row.get("seeds", 1) > 1:
        text += " ± " + format(row[key + "_std"], fmt)
    return text


def markdown(rows: list[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    """Every key of the rows (means and stds) as CSV columns, full precision."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write(path_stem: epath.Path, rows: list[dict], columns: Sequence[Column]) -> str:
    """``<stem>.md`` and ``<stem>.csv``; returns the Markdown."""
    table = markdown(rows, columns)
    path_stem.with_suffix(".md").write_text(table + "\n")
    path_stem.with_suffix(".csv").write_text(csv_text(rows))
    return table


def plot_against_parameters(rows: list[dict], x: str, metrics: Sequence[tuple[str, str]], path: epath.Path,
                            title: str) -> None:
    """One panel per metric against ``x`` (log scale), a point per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for r in rows:
            ax.errorbar(r[x], r[key], yerr=r.get(key + "_std", 0.0), fmt="o", capsize=3)
            ax.annotate(r["method"], (r[x], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel=x, ylabel=label)
    fig.suptitle(title)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
