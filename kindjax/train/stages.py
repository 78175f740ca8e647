"""The stage engine, and what ``python -m kindjax.main`` runs: validate the config, then the job it names.

A *stage* is one training run in its own workdir, fingerprinted by what it is made from
(:func:`fingerprint`): a rerun reuses a stage that finished with the same fingerprint
(:func:`finished`), resumes an interrupted one, trains a finished one on to more steps, evaluates
one again under new sampling or evaluation settings, and moves aside one trained with other settings
(another learning rate, seed, start, fewer steps, …) to train the stage afresh
(:func:`set_aside_changed`); a workdir of another model is refused.  A *job*
(:data:`JOBS`, ``config.job``) chains stages: the core's ``train`` is one stage (then the data
set's evaluation); packages register jobs of several stages (e.g. pre-training, then a transfer).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from kindjax import checkpoints
from kindjax.checkpoints import config_json
from kindjax.config import (EXECUTION_KEYS, EXTENSIONS, ConfigError, base_config, differences, start_keys, validate,
                            with_defaults)
from kindjax.distributed import warn_if_cpu_fallback
from kindjax.data import make_dataset
from kindjax.evaluation.end_of_training import evaluation, training_metrics
from kindjax.models.dit import abstract_params, build_model
from kindjax.io.paths import as_path, read_json, write_json
from kindjax.sharding import mesh_shape
from kindjax.registry import Registry, UnknownName
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
#: its own sections as :attr:`kindjax.config.Extension.unrecorded`; the gradient's reduction dtype and
#: the model's EXECUTION_KEYS change only its rounding, as the device count does).
UNRECORDED = {"job": None, "mesh": None, "model": EXECUTION_KEYS,
              "train": ("log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "max_nonfinite_steps",
                        "max_update_ratio", "grad_reduce_dtype", "class_row_reduce", "compilation_cache"),
              "data": ("workers", "device_prefetch", "verify_latents"),
              "vae": ("encode_batch_size", "prefetch")}
#: Fingerprint sections that change a stage's figures but not its weights: a finished stage is
#: evaluated again under new ones, not trained again.
EVALUATION = ("sample", "eval")


def recorded(c: dict) -> dict:
    """The config JSON ``c`` without its :data:`UNRECORDED` settings, nor the paths of its starts and
    teacher (``init.<start>``, ``train.distill.teacher``: the fingerprint's ``origin`` records what they
    resolve to, relative to the workdir where they lie beside it)."""
    c = dict(c)
    starts = start_keys()
    unrecorded = {**UNRECORDED, **{section: None for e in EXTENSIONS.values() for section in e.unrecorded}}
    for section, keys in unrecorded.items():
        if keys is None:
            c.pop(section, None)
        elif section in c:
            c[section] = {k: v for k, v in c[section].items() if k not in keys}
    if "init" in c:
        c["init"] = {k: v for k, v in c["init"].items() if k not in starts}
    if "distill" in c.get("train", {}):
        c["train"] = {**c["train"], "distill": {k: v for k, v in c["train"]["distill"].items() if k != "teacher"}}
    return c


def fingerprint(config: ml_collections.ConfigDict, start: dict) -> dict:
    """What a stage is made from: its config (model, data, optimizer, steps, sampling and
    evaluation; not :data:`UNRECORDED`) and ``start`` (:func:`kindjax.train.trainer.origin`: the
    checkpoint and step each ``init`` path, and a distillation teacher, resolved to)."""
    return {**recorded(config_json(config)), "origin": start}


def comparable(saved: dict, now: dict, workdir: str) -> tuple[dict, dict]:
    """A fingerprint recorded in ``workdir`` (perhaps before a setting became unrecorded or a key was
    added to the schema, which reads as its default: :func:`kindjax.config.with_defaults`; with absolute
    origin paths or without weight digests) and ``now``, as they compare
    (:func:`kindjax.checkpoints.comparable`)."""
    then_origin, now_origin = checkpoints.comparable(saved.get("origin") or {}, now["origin"], workdir)
    then = with_defaults(recorded(saved), recorded(config_json(base_config())))
    return {**then, "origin": then_origin}, {**now, "origin": now_origin}


def finished(workdir: str, config: ml_collections.ConfigDict, start: dict | None = None) -> dict | None:
    """The metrics of a stage that already ran to ``config.train.num_steps`` with the same
    :func:`fingerprint` (so a rerun reuses it); None otherwise (it is run: resumed, evaluated again,
    or set aside and trained afresh, :func:`stage`)."""
    path = as_path(workdir) / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path)
    now = fingerprint(config, origin(config, workdir) if start is None else start)
    then, now = comparable(metrics.get("fingerprint", {}), now, workdir)
    if metrics.get("step") == config.train.num_steps and "fingerprint" in metrics and then == now:
        return {k: v for k, v in metrics.items() if k != "fingerprint"}
    return None


def saved_fingerprint(meta: dict) -> dict:
    """The :func:`fingerprint` of the run that wrote a checkpoint (``meta``: its config, keys the schema
    gained since then at their defaults, and its origin)."""
    return fingerprint(ml_collections.ConfigDict(with_defaults(meta["config"], config_json(base_config()))),
                       meta.get("origin") or {})


def _weights(fp: dict) -> dict:
    """What a checkpoint's weights are a function of, up to its step: a fingerprint without its
    :data:`EVALUATION` sections and ``train.num_steps`` (a stage trained on is the same run, longer)."""
    out = {k: v for k, v in fp.items() if k not in EVALUATION}
    out["train"] = {k: v for k, v in out["train"].items() if k != "num_steps"}
    return out


def set_aside_changed(config: ml_collections.ConfigDict, workdir: str, now: dict) -> None:
    """Before a stage runs: moves ``workdir`` aside (``<workdir>.from_step_<s>`` when only the step of
    its start changed, else ``<workdir>.stale``; numbered when taken; ``SET_ASIDE.txt`` inside says why)
    when its latest checkpoint was trained with other settings than ``now`` or past
    ``train.num_steps``, so the stage trains afresh: a checkpoint is resumed only by the run it belongs
    to, trained on to more steps, or evaluated again under new :data:`EVALUATION` settings."""
    meta = latest_meta(workdir)
    if meta is None:
        return
    then, now = comparable(saved_fingerprint(meta), now, workdir)
    changed = differences(_weights(then), _weights(now))
    step = int(meta["step"])
    if step > config.train.num_steps:
        changed.append(f"train.num_steps: trained {step} vs {config.train.num_steps}")
    done = (as_path(workdir) / "metrics.json").exists()
    if not changed:
        more = step < config.train.num_steps and done
        if done or more:
            what = f"training it on to step {config.train.num_steps}" if more else "evaluating it again"
            diffs = differences(then, now)
            how = f"with other settings ({'; '.join(diffs[:4])})" if diffs else "without a recorded fingerprint"
            print(f"{workdir} finished at step {step} {how}; {what}.", flush=True)
        return
    only_start = all(d.startswith("origin.") and (".step:" in d or ".weights:" in d) for d in changed)
    suffix = "from_step_" + "_".join(str(v["step"]) for v in then["origin"].values()) if only_start else "stale"
    target, n = f"{workdir}.{suffix}", 1
    while as_path(target).exists():
        target, n = f"{workdir}.{suffix}.{n}", n + 1
    reason = f"{workdir} was trained with other settings ({'; '.join(changed[:4])})"
    if jax.process_index() == 0:
        as_path(workdir).rename(as_path(target))
        (as_path(target) / "SET_ASIDE.txt").write_text(reason + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kindjax stale stage")
    print(f"{reason}; moved it to {target} and training it afresh.", flush=True)


def stage(config: ml_collections.ConfigDict, workdir: str, evaluate, dataset=None) -> dict | None:
    """Runs one training stage unless it already finished with the same :func:`fingerprint`; its
    metrics (with the fingerprint recorded in ``metrics.json``), or None if it was stopped
    (SIGTERM/SIGINT/SIGHUP: the checkpoint is saved and rerunning the command resumes).  A workdir
    trained with other settings is moved aside first and the stage trained afresh
    (:func:`set_aside_changed`).  ``dataset``: the stage's data source when :func:`check` already
    opened it.  A stage of ``train.num_steps=0`` trains nothing: its model is the step-0 checkpoint
    something else wrote to ``workdir`` (e.g. a model assembled from another's parts), checked
    against the config and recorded finished."""
    start = origin(config, workdir)
    metrics = finished(workdir, config, start)
    if metrics is not None:
        print(f"{workdir} finished with these settings: reusing it ({as_path(workdir) / 'metrics.json'}).", flush=True)
        return metrics
    now = fingerprint(config, start)
    if config.train.num_steps == 0:
        return written_model(config, workdir, now)
    set_aside_changed(config, workdir, now)
    train(config, workdir, evaluate=evaluate, dataset=dataset)
    path = as_path(workdir) / "metrics.json"
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


def latest_meta(workdir: str) -> dict | None:
    """The metadata of ``workdir``'s latest checkpoint; None when it holds none, or the latest does not
    read (a damaged step is the trainer's to set aside)."""
    if not (as_path(workdir) / checkpoints.CHECKPOINTS).is_dir():
        return None
    try:
        return checkpoints.locate(workdir).meta
    except Exception:  # noqa: BLE001
        return None


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses, before anything runs, a workdir whose latest checkpoint is of another model."""
    meta = latest_meta(workdir)
    if meta is not None:
        checkpoints.check_same_model(meta["config"], config, workdir)


def train_job(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Job ``train``: one stage (:func:`stage`) in ``workdir``, then the chosen metrics computed at the end
    of training (:mod:`kindjax.evaluation.end_of_training`; the digits' by default)."""
    dataset = check(config)
    check_workdir(config, workdir)
    stage(config, workdir, evaluation(config), dataset)


#: ``config.job`` → ``job(config, workdir)``.
JOBS: Registry[Callable[[ml_collections.ConfigDict, str], Any]] = Registry("job", key="job")
JOBS.register("train", train_job)


def compilation_cache_dir(setting: str, workdir: str, current: str | None) -> str | None:
    """The directory of JAX's persistent compilation cache for ``train.compilation_cache=setting``:
    ``"auto"``: ``WORKDIR/compilation_cache``; a path (local or ``gs://``): that one; ``""``: none.
    ``current``, the directory JAX already uses (``JAX_COMPILATION_CACHE_DIR``, or an earlier call
    in this process: JAX sets its cache up once), wins."""
    if current or not setting:
        return current or None
    return str(as_path(workdir) / "compilation_cache") if setting == "auto" else setting


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Turns JAX's persistent compilation cache on in :func:`compilation_cache_dir`, before anything is
    compiled, so a restarted job loads its compiled programs instead of compiling them again (a
    sweep: one cache under its workdir for all its runs).  The directory, or None."""
    current = jax.config.jax_compilation_cache_dir
    path = compilation_cache_dir(config.train.compilation_cache, workdir, current)
    if path != current:
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs the job ``config.job`` names in ``workdir``."""
    warn_if_cpu_fallback()
    cache = use_compilation_cache(config, workdir)
    if cache and jax.process_index() == 0:
        print(f"Compilation cache: {cache}", flush=True)
    try:
        job = JOBS[config.job]
    except UnknownName as unknown:
        raise ConfigError(str(unknown)) from None
    if job is not train_job:
        validate(config, jax.device_count())
    job(config, workdir)
