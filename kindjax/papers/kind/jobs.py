"""KIND's job ``kind_transfer`` (``python -m kindjax.main`` with ``job="kind_transfer"``): KIND
pre-training under the class gate (``WORKDIR/pretrain``), then transfer of the frozen learngene to
the novel classes ``transfer.classes`` with fresh tailors (``WORKDIR/transfer``); the figures of
both in ``WORKDIR/metrics.json``.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from kindjax.io.paths import as_path, write_json
from kindjax.evaluation.end_of_training import evaluation
from kindjax.evaluation.metrics import metric_values
from kindjax.papers.kind.digits_report import evaluate_kind_digits, prefixed
from kindjax.papers.kind.transfer import transfer_config
from kindjax.train.stages import check, check_workdir, stage


def run_kind_transfer(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    pre_dir, tr_dir = os.path.join(workdir, "pretrain"), os.path.join(workdir, "transfer")
    pre_config = config.copy_and_resolve_references()
    pre_config.job = "train"
    tr_config = transfer_config(config, pre_dir)
    pre_data, tr_data = check(pre_config), check(tr_config, starts=False)
    check_workdir(pre_config, pre_dir)
    check_workdir(tr_config, tr_dir)
    pre = stage(pre_config, pre_dir, evaluate_kind_digits, pre_data)
    novel = stage(tr_config, tr_dir, evaluation(tr_config), tr_data) if pre is not None else None
    if novel is None:
        print("Stopped before the end; rerun the same command to resume.", flush=True)
        return None
    report = {k: v for k, v in pre.items() if k != "step"}
    report.update(prefixed("novel", metric_values(novel)))
    if jax.process_index() == 0:
        write_json(as_path(workdir) / "metrics.json", report)
    print("KIND on the digits:\n" + "\n".join(f"  {k:30s} {v:.4f}" for k, v in report.items()), flush=True)
    return report
