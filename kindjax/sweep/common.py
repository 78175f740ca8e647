"""What several sweep experiments share: a task's reference batch, and the evaluation report of a finished
run against it (``python -m kindjax.evaluation``'s pipeline)."""
from __future__ import annotations

import json
import time
from typing import Callable

import jax
from etils import epath

from kindjax.config import ConfigError
from kindjax.sweep.grid import Run


def reference_path(pattern: str, workdir: str, task: str) -> str:
    """The reference batch of ``task``: ``pattern`` (``eval.reference``) with ``{task}`` replaced by the
    task, or by default ``workdir/references/<task>.npz`` (written by :func:`task_reference`)."""
    return pattern.replace("{task}", task) if pattern else str(epath.Path(workdir) / "references" / f"{task}.npz")


def check_reference_pattern(pattern: str, workdir: str, unit: str, example: str) -> None:
    """Refuses an ``eval.reference`` without ``{task}``: one file would score every ``unit`` of the grid
    (``example``: one of their names), each of which has its own reference batch."""
    if pattern and "{task}" not in pattern:
        raise ConfigError(f"eval.reference={pattern!r}: the sweep scores each {unit} against its own reference batch; "
                          f"give a pattern with {{task}}, which becomes the {unit}'s name (e.g. refs/{{task}}.npz → "
                          f"refs/{example}.npz), or leave it empty ({workdir}/references/<{unit}>.npz, written from "
                          f"the validation images)")


def task_reference(run: Run, log: Callable[[str], None] = print) -> str:
    """The reference batch of the run's task (``run.extra["reference"]``); written here (process 0)
    from the task's validation images (every image of its classes; the digits have no validation
    split: every digit of the classes; an image folder, ``domain_shift``'s data: all its images) when it
    is missing."""
    path = epath.Path(run.extra["reference"])
    if not path.exists() and jax.process_index() == 0:
        from kindjax.evaluation.reference import write_reference_batch

        c = run.config.copy_and_resolve_references()
        c.data.split = "validation"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        write_reference_batch(c, str(tmp), 0, c.eval.seed, log)
        tmp.rename(path)
    while not path.exists():   # the other processes of a multi-host run: process 0 writes it
        time.sleep(5)
    return str(path)


def pipeline_report(run: Run) -> dict:
    """The chosen metrics (``eval.metrics``; by default ADM's FID, sFID, IS, precision, recall, and FDD
    with ``eval.dinov2_weights``) of the run's EMA samples at its last step against its task's reference
    (:func:`task_reference`), by :func:`kindjax.evaluation.pipeline.evaluate`: ``eval_<step>.json``
    (``metrics``, and the ``features`` / ``reference_features`` files of Inception features), reused when
    it was computed against the same reference with as many samples and the same ``eval.metrics``."""
    from kindjax.evaluation.pipeline import evaluate

    reference = task_reference(run)
    step = run.config.train.num_steps
    report_path = epath.Path(run.workdir) / f"eval_{step}.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    evaluated = report.get("config", {}).get("eval", {})
    if (evaluated.get("reference") != reference or evaluated.get("num_samples") != run.config.eval.num_samples
            or evaluated.get("metrics", []) != list(run.config.eval.metrics) or "reference_features" not in report):
        c = run.config.copy_and_resolve_references()
        c.eval.reference = reference
        evaluate(c, run.workdir, step)
        report = json.loads(report_path.read_text())
    return report
