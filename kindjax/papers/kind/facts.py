"""Facts of the KIND paper (ICML 2025) that kindjax reads: one home for each."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kindjax.data.class_groups import table_lines


def paper_fid_tables() -> dict[tuple[str, str], tuple[float, np.ndarray]]:
    """``(arch, method) → (Table 2 FID, Table 8 FIDs of the 18 tasks)`` from
    ``tables/kind_fid_tables.tsv`` (KIND paper, Tables 2 and 8)."""
    out = {}
    for arch, method, table2, *tasks in table_lines("kindjax.papers.kind", "tables", "kind_fid_tables.tsv"):
        out[(arch, method)] = (float(table2), np.asarray(tasks, np.float64))
    return out


def paper_aggregation(task_sizes: Sequence[int]) -> list[dict]:
    """For each (arch, method) of the paper: Table 2's FID against the plain mean of Table 8's per-task
    FIDs, the mean weighted by the tasks' class counts (pooled samples with a fixed number per class
    would weight so), and the smallest per-task FID.  Any weighted mean of per-task FIDs lies between
    their min and max; a Table 2 FID below the min can only come from scoring pooled samples."""
    weights = np.asarray(task_sizes, np.float64)
    rows = []
    for (arch, method), (table2, tasks) in paper_fid_tables().items():
        rows.append(dict(arch=arch, method=method, table2=table2, mean=float(tasks.mean()),
                         class_weighted_mean=float(np.average(tasks, weights=weights)), min=float(tasks.min()),
                         ratio=table2 / float(tasks.mean())))
    return rows
