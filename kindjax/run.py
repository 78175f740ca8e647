"""What ``python -m kindjax.main`` runs: validate the config, then the job it names.

Jobs: ``train`` (train, then evaluate where the data set has an evaluator) and
``kind_transfer`` (KIND pre-training under the class gate, then transfer of the
frozen learngene to novel classes with fresh tailors; ``WORKDIR/pretrain`` and
``WORKDIR/transfer``, figures of both in ``WORKDIR/metrics.json``).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from kindjax.config import ConfigError, validate
from kindjax.distributed import warn_if_cpu_fallback
from kindjax.data import make_dataset
from kindjax.evaluation.digits_report import evaluate_digits, evaluate_kind_digits
from kindjax.models.dit import abstract_params, build_model
from kindjax.sharding import mesh_shape
from kindjax.train.trainer import train
from kindjax.transfer import transfer_config


def check(config: ml_collections.ConfigDict):
    """Every check that needs no compilation: the schema, the mesh, the data source, and a
    shape-only trace of the model (which surfaces a linear variant's own errors, e.g. a rank that
    does not fit).  Returns the data source, so the run does not open it twice."""
    num_devices = jax.device_count()
    try:
        mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate(config, num_devices)
    dataset = make_dataset(config)
    try:
        abstract_params(build_model(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataset


def finished(workdir: str, num_steps: int) -> dict | None:
    """The metrics of a stage that already ran to ``num_steps`` (so a rerun skips it)."""
    path = os.path.join(workdir, "metrics.json")
    if os.path.exists(path):
        metrics = json.load(open(path))
        if metrics.get("step") == num_steps:
            return metrics
    return None


def stage(config: ml_collections.ConfigDict, workdir: str, evaluate, dataset=None) -> dict | None:
    """Runs one training stage unless it already finished; its metrics, or None if it was
    preempted (SIGTERM: the checkpoint is saved and rerunning the command resumes).
    ``dataset``: the stage's data source when :func:`check` already opened it."""
    metrics = finished(workdir, config.train.num_steps)
    if metrics is None:
        train(config, workdir, evaluate=evaluate, dataset=dataset)
        metrics = finished(workdir, config.train.num_steps)
    return metrics


def run_kind_transfer(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    pre_dir, tr_dir = os.path.join(workdir, "pretrain"), os.path.join(workdir, "transfer")
    pre_config = config.copy_and_resolve_references()
    pre_config.job = "train"
    tr_config = transfer_config(config, pre_dir)
    pre_data, tr_data = check(pre_config), check(tr_config)
    pre = stage(pre_config, pre_dir, evaluate_kind_digits, pre_data)
    novel = stage(tr_config, tr_dir, evaluate_digits, tr_data) if pre is not None else None
    if novel is None:
        print("Stopped before the end; rerun the same command to resume.", flush=True)
        return None
    report = {k: v for k, v in pre.items() if k != "step"}
    report.update(novel_accuracy=novel["sample_accuracy"], novel_frechet_distance=novel["frechet_distance"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
    print("KIND on the digits:\n" + "\n".join(f"  {k:30s} {v:.4f}" for k, v in report.items()), flush=True)
    return report


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    warn_if_cpu_fallback()
    if config.job == "kind_transfer":
        validate(config, jax.device_count())
        run_kind_transfer(config, workdir)
    else:
        dataset = check(config)
        train(config, workdir, evaluate=evaluate_digits if config.data.name == "digits" else None, dataset=dataset)
