"""What ``python -m kindjax.main`` runs: validate the config, then the job it names.

Jobs: ``train`` (train, then evaluate where the data set has an evaluator),
``kind_transfer`` (KIND pre-training under the class gate, then transfer of the
frozen learngene to novel classes with fresh tailors; ``WORKDIR/pretrain`` and
``WORKDIR/transfer``, figures of both in ``WORKDIR/metrics.json``) and ``fine_init``
(FINE's initialisation of a model of another depth from ``init.fine_learngene``:
the Σ-only stage ``WORKDIR/sigma`` when ``init.fine_sigma="trained"``, then normal
training ``WORKDIR/train``, dense or factorized by ``init.materialize``).
"""
from __future__ import annotations

import os

import jax
import ml_collections

from kindjax import checkpoints
from kindjax.checkpoints import config_json
from kindjax.config import ConfigError, differences, validate
from kindjax.distributed import warn_if_cpu_fallback
from kindjax.data import make_dataset
from kindjax.evaluation.digits_report import evaluate_digits, evaluate_kind_digits
from kindjax.models.dit import abstract_params, build_model
from kindjax.paths import as_path, read_json, write_json
from kindjax.sharding import mesh_shape
from kindjax.train.trainer import origin, train
from kindjax.transfer import transfer_config
from kindjax.transfer.fine import LimitedData


def check(config: ml_collections.ConfigDict, starts: bool = True):
    """Every check that needs no compilation: the schema, the mesh, the data source, a
    shape-only trace of the model (which surfaces a linear variant's own errors, e.g. a rank that
    does not fit) and, with ``starts``, that each ``init`` path holds a checkpoint (``False`` for a
    stage whose start an earlier stage writes).  Nothing is written.  Returns the data source, so
    the run does not open it twice."""
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
    if starts:
        origin(config)
    return dataset


#: Settings that do not change what a stage produces (left out of its fingerprint).
UNRECORDED = {"job": None, "mesh": None, "transfer": None,
              "train": ("log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "max_nonfinite_steps"),
              "vae": ("encode_batch_size", "prefetch")}


def fingerprint(config: ml_collections.ConfigDict, start: dict) -> dict:
    """What a stage is made from: its config (model, data, optimizer, steps, sampling and
    evaluation; not :data:`UNRECORDED`) and ``start`` (:func:`kindjax.train.trainer.origin`: the
    checkpoint and step each ``init`` path, and a distillation teacher, resolved to)."""
    c = config_json(config)
    for section, keys in UNRECORDED.items():
        if keys is None:
            c.pop(section, None)
        else:
            c[section] = {k: v for k, v in c[section].items() if k not in keys}
    return {**c, "origin": start}


def finished(workdir: str, config: ml_collections.ConfigDict, start: dict | None = None) -> dict | None:
    """The metrics of a stage that already ran to ``config.train.num_steps`` with the same
    :func:`fingerprint` (so a rerun reuses it); None otherwise (it is run: resumed, or refused
    when its checkpoint is of another model or start)."""
    path = as_path(workdir) / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path)
    now = fingerprint(config, origin(config) if start is None else start)
    if metrics.get("step") == config.train.num_steps and metrics.get("fingerprint") == now:
        return {k: v for k, v in metrics.items() if k != "fingerprint"}
    return None


def stage(config: ml_collections.ConfigDict, workdir: str, evaluate, dataset=None) -> dict | None:
    """Runs one training stage unless it already finished with the same :func:`fingerprint`; its
    metrics (with the fingerprint recorded in ``metrics.json``), or None if it was stopped
    (SIGTERM/SIGINT: the checkpoint is saved and rerunning the command resumes).
    ``dataset``: the stage's data source when :func:`check` already opened it.  A stage of
    ``train.num_steps=0`` trains nothing: its model is the step-0 checkpoint something else wrote
    to ``workdir`` (e.g. a recombined KIND model), checked against the config and recorded finished."""
    start = origin(config)
    metrics = finished(workdir, config, start)
    if metrics is not None:
        return metrics
    now = fingerprint(config, start)
    path = as_path(workdir) / "metrics.json"
    if path.exists():
        changed = differences(read_json(path).get("fingerprint", {}), now)
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
        raise ConfigError(f"train.num_steps=0 trains nothing, but {workdir} holds no checkpoint: write the model "
                          f"there first (e.g. python -m kindjax.variable_size), or give train.num_steps > 0") from None
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


def set_aside_stale_transfer(tr_config: ml_collections.ConfigDict, tr_dir: str) -> None:
    """Moves ``tr_dir`` aside (``<tr_dir>.from_step_<s>``) when its run started from another step of
    the pre-training than the one its ``init`` resolves to now, so the transfer is run again."""
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
    print(f"{tr_dir} was trained from another pre-training step ({'; '.join(differences(saved, now))}); "
          f"moved it to {target} and training the transfer again.", flush=True)


def run_kind_transfer(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    pre_dir, tr_dir = os.path.join(workdir, "pretrain"), os.path.join(workdir, "transfer")
    pre_config = config.copy_and_resolve_references()
    pre_config.job = "train"
    tr_config = transfer_config(config, pre_dir)
    pre_data, tr_data = check(pre_config), check(tr_config, starts=False)
    check_workdir(pre_config, pre_dir)
    check_workdir(tr_config, tr_dir)
    pre = stage(pre_config, pre_dir, evaluate_kind_digits, pre_data)
    if pre is not None:
        set_aside_stale_transfer(tr_config, tr_dir)
    novel = stage(tr_config, tr_dir, evaluate_digits, tr_data) if pre is not None else None
    if novel is None:
        print("Stopped before the end; rerun the same command to resume.", flush=True)
        return None
    report = {k: v for k, v in pre.items() if k != "step"}
    report.update(novel_accuracy=novel["sample_accuracy"], novel_frechet_distance=novel["frechet_distance"])
    if jax.process_index() == 0:
        write_json(as_path(workdir) / "metrics.json", report)
    print("KIND on the digits:\n" + "\n".join(f"  {k:30s} {v:.4f}" for k, v in report.items()), flush=True)
    return report


#: ``train.trainable`` of FINE's Σ-only stage: every layer's Σ, nothing else.
SIGMA_ONLY = ("/sigma$",)


def fine_init_configs(config: ml_collections.ConfigDict, workdir: str
                      ) -> tuple[ml_collections.ConfigDict | None, ml_collections.ConfigDict]:
    """The stages of ``job="fine_init"``: the Σ-only stage (``init.fine_sigma="trained"`` only; ``None``
    otherwise) and the normal training.  The Σ-only stage draws the new Σ at random, trains only
    ``Σ`` (:data:`SIGMA_ONLY`) for ``init.sigma_steps`` at ``init.sigma_lr`` with no EMA lag (its
    last parameters are the next stage's start); the training stage starts from it with every
    leaf copied (``fine_sigma="copy"``), as a dense DiT when ``init.materialize``."""
    if config.model.linear.kind != "fine":
        raise ConfigError(f"job='fine_init' initialises a FINE model of another depth: set model.linear to the "
                          f"learngene's FINE settings (kind='fine'), got kind={config.model.linear.kind!r}")
    init = config.init
    sigma = None
    main = config.copy_and_resolve_references()
    main.job = "train"
    if init.fine_sigma == "trained":
        sigma = config.copy_and_resolve_references()
        sigma.job = "train"
        sigma.init.update(fine_sigma="random", materialize=False)   # factorized, whatever the next stage is
        sigma.train.update(num_steps=init.sigma_steps, trainable=SIGMA_ONLY, ema_decay=0.0,
                           checkpoint_every=min(config.train.checkpoint_every, init.sigma_steps),
                           sample_every=max(config.train.sample_every, init.sigma_steps))
        sigma.optim.update(lr=init.sigma_lr, warmup_steps=0)
        main.init.update(fine_learngene=os.path.join(workdir, "sigma"), fine_sigma="copy")
    if init.materialize:
        main.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    return sigma, main


def run_fine_init(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    sigma_dir, main_dir = os.path.join(workdir, "sigma"), os.path.join(workdir, "train")
    sigma_config, main_config = fine_init_configs(config, workdir)
    evaluate = evaluate_digits if config.data.name == "digits" else None
    if sigma_config is not None:
        data = check(sigma_config)
        check_workdir(sigma_config, sigma_dir)
        limited = LimitedData(data, config.init.sigma_batches) if config.init.sigma_batches else data
        main_data = check(main_config, starts=False)
        check_workdir(main_config, main_dir)
        if stage(sigma_config, sigma_dir, lambda trainer, state: {}, limited) is None:
            print("Stopped before the end; rerun the same command to resume.", flush=True)
            return None
        set_aside_stale_transfer(main_config, main_dir)
    else:
        main_data = check(main_config)
        check_workdir(main_config, main_dir)
    metrics = stage(main_config, main_dir, evaluate, main_data)
    if metrics is None:
        print("Stopped before the end; rerun the same command to resume.", flush=True)
        return None
    if jax.process_index() == 0:
        write_json(as_path(workdir) / "metrics.json", metrics)
    print(f"FINE initialisation ({config.init.fine_sigma} Σ) then training, {main_dir}:\n" +
          "\n".join(f"  {k:30s} {v}" for k, v in metrics.items()), flush=True)
    return metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    warn_if_cpu_fallback()
    if config.job == "kind_transfer":
        validate(config, jax.device_count())
        run_kind_transfer(config, workdir)
    elif config.job == "fine_init":
        validate(config, jax.device_count())
        run_fine_init(config, workdir)
    else:
        dataset = check(config)
        check_workdir(config, workdir)
        train(config, workdir, evaluate=evaluate_digits if config.data.name == "digits" else None, dataset=dataset)
