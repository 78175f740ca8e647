"""The stage engine, and what ``python -m kindjax.main`` runs: validate the config, then the job it names.

A *stage* is one training run in its own workdir, fingerprinted by what it is made from
(:func:`fingerprint`): a rerun reuses a stage that finished with the same fingerprint
(:func:`finished`), resumes an interrupted one, and refuses a workdir of another model.  A *job*
(:data:`JOBS`, ``config.job``) chains stages: the core's ``train`` is one stage (then the data
set's evaluation); packages register jobs of several stages (e.g. pre-training, then a transfer).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from kindjax import checkpoints
from kindjax.checkpoints import config_json
from kindjax.config import EXTENSIONS, ConfigError, base_config, differences, validate, with_defaults
from kindjax.distributed import warn_if_cpu_fallback
from kindjax.data import make_dataset
from kindjax.evaluation.end_of_training import evaluation, training_metrics
from kindjax.models.dit import abstract_params, build_model
from kindjax.io.paths import as_path, read_json, write_json
from kindjax.sharding import mesh_shape
from kindjax.registry import Registry
from kindjax.train.trainer import origin, train


def check(config: ml_collections.ConfigDict, starts: bool = True):
    """Every check that needs no compilation: the schema, the mesh, the names of ``eval.metrics``, the
    data source, a shape-only trace of the model (which surfaces a linear variant's own errors, e.g. a
    rank that does not fit) and, with ``starts``, that each ``init`` path holds a checkpoint (``False``
    for a stage whose start an earlier stage writes).  Nothing is written.  Returns the data source,
    so the run does not open it twice."""
    num_devices = jax.device_count()
    try:
        mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate(config, num_devices)
    training_metrics(config)   # eval.metrics names registered metrics
    dataset = make_dataset(config)
    try:
        abstract_params(build_model(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if starts:
        origin(config)
    return dataset


#: Settings that do not change what a stage produces (left out of its fingerprint; a package adds
#: its own sections as :attr:`kindjax.config.Extension.unrecorded`).
UNRECORDED = {"job": None, "mesh": None,
              "train": ("log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "max_nonfinite_steps"),
              "vae": ("encode_batch_size", "prefetch")}


def fingerprint(config: ml_collections.ConfigDict, start: dict) -> dict:
    """What a stage is made from: its config (model, data, optimizer, steps, sampling and
    evaluation; not :data:`UNRECORDED`) and ``start`` (:func:`kindjax.train.trainer.origin`: the
    checkpoint and step each ``init`` path, and a distillation teacher, resolved to)."""
    c = config_json(config)
    unrecorded = {**UNRECORDED, **{section: None for e in EXTENSIONS.values() for section in e.unrecorded}}
    for section, keys in unrecorded.items():
        if keys is None:
            c.pop(section, None)
        else:
            c[section] = {k: v for k, v in c[section].items() if k not in keys}
    return {**c, "origin": start}


def recorded(metrics: dict) -> dict:
    """The fingerprint a stage's ``metrics.json`` records, keys the schema added since at their
    defaults (:func:`kindjax.config.with_defaults`)."""
    return with_defaults(metrics.get("fingerprint", {}), fingerprint(base_config(), {}))


def finished(workdir: str, config: ml_collections.ConfigDict, start: dict | None = None) -> dict | None:
    """The metrics of a stage that already ran to ``config.train.num_steps`` with the same
    :func:`fingerprint` (so a rerun reuses it); None otherwise (it is run: resumed, or refused
    when its checkpoint is of another model or start)."""
    path = as_path(workdir) / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path)
    now = fingerprint(config, origin(config) if start is None else start)
    if metrics.get("step") == config.train.num_steps and "fingerprint" in metrics and recorded(metrics) == now:
        return {k: v for k, v in metrics.items() if k != "fingerprint"}
    return None


def stage(config: ml_collections.ConfigDict, workdir: str, evaluate, dataset=None) -> dict | None:
    """Runs one training stage unless it already finished with the same :func:`fingerprint`; its
    metrics (with the fingerprint recorded in ``metrics.json``), or None if it was stopped
    (SIGTERM/SIGINT: the checkpoint is saved and rerunning the command resumes).
    ``dataset``: the stage's data source when :func:`check` already opened it.  A stage of
    ``train.num_steps=0`` trains nothing: its model is the step-0 checkpoint something else wrote
    to ``workdir`` (e.g. a model assembled from another's parts), checked against the config and
    recorded finished."""
    start = origin(config)
    metrics = finished(workdir, config, start)
    if metrics is not None:
        return metrics
    now = fingerprint(config, start)
    path = as_path(workdir) / "metrics.json"
    if path.exists():
        changed = differences(recorded(read_json(path)), now)
        print(f"{workdir} finished with other settings ({'; '.join(changed[:4])}); running it again.", flush=True)
    if config.train.num_steps == 0:
        return written_model(config, workdir, now)
    train(config, workdir, evaluate=evaluate, dataset=dataset)
    if not path.exists():
        return None
    metrics = read_json(path)
    if metrics.get("step") != config.train.num_steps:
        return None
    metrics.pop("fingerprint", None)
    if jax.process_index() == 0:
        write_json(path, {**metrics, "fingerprint": now})
    return metrics


def written_model(config: ml_collections.ConfigDict, workdir: str, now: dict) -> dict:
    """Records the 0-step stage of ``workdir`` finished (``metrics.json`` with the fingerprint ``now``)
    once its step-0 checkpoint is there and of ``config``'s model; refuses otherwise."""
    try:
        located = checkpoints.locate(workdir)
    except FileNotFoundError:
        raise ConfigError(f"train.num_steps=0 trains nothing, but {workdir} holds no checkpoint: write the model's "
                          f"step-0 checkpoint there first, or give train.num_steps > 0") from None
    if located.meta["step"] != 0:
        raise ConfigError(f"train.num_steps=0 but {workdir} holds step {located.meta['step']}: a 0-step stage's model "
                          f"is its step-0 checkpoint; use another workdir")
    checkpoints.check_same_model(located.meta["config"], config, workdir)
    metrics = {"step": 0}
    if jax.process_index() == 0:
        write_json(as_path(workdir) / "metrics.json", {**metrics, "fingerprint": now})
    return metrics


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses, before anything runs, a workdir whose latest checkpoint is of another model."""
    if not (as_path(workdir) / checkpoints.CHECKPOINTS).is_dir():
        return
    try:
        meta = checkpoints.locate(workdir).meta
    except Exception:  # noqa: BLE001 — a damaged latest step is handled (set aside) by the trainer
        return
    checkpoints.check_same_model(meta["config"], config, workdir)


def set_aside_stale(tr_config: ml_collections.ConfigDict, tr_dir: str) -> None:
    """Moves ``tr_dir`` aside (``<tr_dir>.from_step_<s>``) when its run started from another step of
    the earlier stage than the one its ``init`` resolves to now, so the later stage is run again."""
    if not (as_path(tr_dir) / checkpoints.CHECKPOINTS).is_dir():
        return
    try:
        saved = checkpoints.locate(tr_dir).meta.get("origin")
    except Exception:  # noqa: BLE001
        return
    now = origin(tr_config)
    if not saved or saved == now:
        return
    steps = "_".join(str(v["step"]) for v in saved.values())
    target = f"{tr_dir}.from_step_{steps}"
    n = 1
    while as_path(target).exists():
        target, n = f"{tr_dir}.from_step_{steps}.{n}", n + 1
    if jax.process_index() == 0:
        as_path(tr_dir).rename(as_path(target))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kindjax stale transfer")
    print(f"{tr_dir} was trained from another step of its start ({'; '.join(differences(saved, now))}); "
          f"moved it to {target} and training it again.", flush=True)


def train_job(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Job ``train``: one stage in ``workdir``, then the chosen metrics computed at the end of training
    (:mod:`kindjax.evaluation.end_of_training`; the digits' by default)."""
    dataset = check(config)
    check_workdir(config, workdir)
    train(config, workdir, evaluate=evaluation(config), dataset=dataset)


#: ``config.job`` → ``job(config, workdir)``.
JOBS: Registry[Callable[[ml_collections.ConfigDict, str], Any]] = Registry("job", key="job")
JOBS.register("train", train_job)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs the job ``config.job`` names in ``workdir``."""
    warn_if_cpu_fallback()
    job = JOBS[config.job]
    if job is not train_job:
        validate(config, jax.device_count())
    job(config, workdir)
