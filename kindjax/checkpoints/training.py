"""The training layout: Orbax ``CheckpointManager`` with one item per part of the train state.

Layout of ``WORKDIR/checkpoints/<step>/``:
  ``params``, ``ema_params``, ``opt_state`` — PyTree items (OCDBT), each restorable
  alone, and any sub-tree of them by a partial restore;
  ``meta`` — JSON: ``step``, the full ``config``, ``origin`` (the checkpoint each ``init``
  path, and a distillation teacher, resolved to when the run started) and ``checksums`` (two
  32-bit sums of every array's bits, :func:`checksums`) with ``finite`` (every float is finite:
  non-finite state is never saved).
The data position and the PRNG position of a run are its step (batches and keys
are pure functions of ``(seed, step)``), so the step restores both.

:func:`restore_verified` reads the newest step whose arrays read and match their checksums;
a step that does not is reported in one line and moved to ``WORKDIR/set_aside/<step>``
(renamed, never deleted).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kindjax.checkpoints.integrity import CheckpointError, differing, tree_checksums, verify
from kindjax.checkpoints.layout import CHECKPOINTS, META, read_meta
from kindjax.config import EXECUTION_KEYS, ConfigError, differences, model_config, with_defaults
from kindjax.io.paths import as_path

STATE_ITEMS = ("params", "ema_params", "opt_state")
#: Where :func:`restore_verified` moves a step that does not read or verify (``WORKDIR/set_aside``).
SET_ASIDE = "set_aside"


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(config.to_json())


def manager(directory: epath.PathLike, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of the step directories under ``directory`` (``WORKDIR/checkpoints``).  It
    deletes nothing: :func:`save` rotates (Orbax's ``max_to_keep`` deletes the old steps as the new
    one starts, so a failed write would leave none)."""
    return ocp.CheckpointManager(
        as_path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, read_only=read_only),
        item_names=STATE_ITEMS + (META,))


def rotate(mngr: ocp.CheckpointManager, keep: int) -> None:
    """Waits for the save in flight, then deletes the oldest steps beyond the newest ``keep``
    (all complete: a failed save raises here, before anything is deleted)."""
    mngr.wait_until_finished()
    for step in sorted(mngr.all_steps())[:-keep]:
        mngr.delete(step)


def checksums(state: dict) -> tuple[dict[str, dict[str, list[int]]], bool]:
    """``{item: {key path: [h1, h2]}}`` of the :data:`STATE_ITEMS` of ``state`` and whether every
    float in them is finite (:func:`kindjax.checkpoints.integrity.tree_checksums`)."""
    return tree_checksums({name: state[name] for name in STATE_ITEMS})


def save(mngr: ocp.CheckpointManager, state: dict, config: ml_collections.ConfigDict,
         origin: dict | None = None, keep: int | None = None) -> None:
    """Saves the train state at ``state['step']`` with its checksums (asynchronously; see
    ``mngr.wait_until_finished``); refuses state with a non-finite float (nothing is written).
    ``keep``: first :func:`rotate` to the newest ``keep`` complete steps, so ``keep`` complete
    steps remain while this one is written."""
    step = int(state["step"])
    if keep is not None:
        rotate(mngr, keep)
    table, finite = checksums(state)
    if not finite:
        raise CheckpointError(f"step {step}: the train state holds NaN or Inf; it was not saved (the newest "
                              f"checkpoint in {mngr.directory} is step {mngr.latest_step()})")
    items = {name: ocp.args.StandardSave(state[name]) for name in STATE_ITEMS}
    meta = {"step": step, "config": config_json(config), "origin": origin or {}, "checksums": table,
            "finite": True}
    mngr.save(step, args=ocp.args.Composite(**{META: ocp.args.JsonSave(meta)}, **items), force=True)


def check_same_model(saved_config: dict, config: ml_collections.ConfigDict, directory: str) -> None:
    """Refuses to resume a checkpoint written for another model config.  A ``model`` key the schema
    gained after the checkpoint was written counts as its default there (``model.drop_path`` 0 for a
    checkpoint older than drop path), so old runs resume unless the config sets the new key; the
    :data:`~kindjax.config.EXECUTION_KEYS` (attention kernel, remat, scan) may change."""
    saved = with_defaults(saved_config["model"], json.loads(model_config().to_json()))
    now = config_json(config)["model"]
    saved, now = ({k: v for k, v in m.items() if k not in EXECUTION_KEYS} for m in (saved, now))
    diffs = differences(saved, now, ("checkpoint ", "config "), "model.")
    if diffs:
        detail = ", ".join(diffs)
        raise ConfigError(
            f"{directory} holds a checkpoint of a different model ({detail}). Run with the config that "
            f"wrote it, or use another folder.")


def portable(origin: dict, workdir: epath.PathLike) -> dict:
    """``origin`` (``{key: {path, step}}``) with each path that lies inside the directory holding
    ``workdir`` (the job's or the sweep's workdir, whose stages are its sub-directories) written
    relative to it, so a finished workdir moved or copied as a whole keeps its origin; other paths
    stay absolute.  Idempotent: a path already relative is kept."""
    base = str(as_path(workdir).parent).rstrip("/") + "/"
    out = {}
    for key, entry in origin.items():
        path = str(entry["path"])
        out[key] = {**entry, "path": path[len(base):] if path.startswith(base) else path}
    return out


def comparable(saved: dict, now: dict, workdir: epath.PathLike) -> tuple[dict, dict]:
    """Two origins of ``workdir`` as they compare: :func:`portable`, and an entry's ``weights`` digest
    left out of both where the saved one (recorded before digests were) has none."""
    saved, now = portable(saved, workdir), portable(now, workdir)
    for key in set(saved) & set(now):
        if "weights" not in saved[key]:
            now[key] = {k: v for k, v in now[key].items() if k != "weights"}
    return saved, now


def weights_digest(meta: dict) -> str | None:
    """A short digest of the checksums a checkpoint's ``meta`` records: which weights it holds (a
    stage trained again to the same step holds others); None for one written before checksums."""
    if "checksums" not in meta:
        return None
    return hashlib.sha256(json.dumps(meta["checksums"], sort_keys=True).encode()).hexdigest()[:16]


def check_same_origin(saved: dict | None, now: dict, directory: str) -> None:
    """Refuses to resume a run that started from, or distilled from, another checkpoint (another path,
    or another step of it, or other weights at that step) than the config resolves to now (``origin``;
    its keys are ``init`` keys, or whole config paths such as ``train.distill.teacher``), compared as
    :func:`comparable` records of ``directory``."""
    if not saved:
        return
    saved, now = comparable(saved, now, directory)
    diffs = [d for key in sorted(set(saved) | set(now))
             for d in differences({key: saved.get(key)}, {key: now.get(key)}, ("checkpoint ", "now "),
                                  "" if "." in key else "init.")]
    if diffs:
        raise ConfigError(f"{directory} holds a run that started from, or distilled from, another checkpoint "
                          f"({'; '.join(diffs)}). Use another --workdir, or move {directory} aside to start over.")


def restore(mngr: ocp.CheckpointManager, abstract_state: dict, step: int | None = None) -> dict:
    """Restores the full train state onto the shardings given by ``abstract_state``
    (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``)."""
    step = mngr.latest_step() if step is None else step
    items = {name: ocp.args.StandardRestore(abstract_state[name]) for name in STATE_ITEMS}
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    state = {name: restored[name] for name in STATE_ITEMS}
    state["step"] = jax.device_put(step, abstract_state["step"].sharding)
    return state


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` on every process (one small collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _short(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].split(' See full')[0][:200] if lines else ''}"


def set_aside(mngr: ocp.CheckpointManager, step: int, reason: str) -> str:
    """Moves step directory ``step`` to ``WORKDIR/set_aside/<step>`` (a numbered suffix if taken),
    with ``reason`` in its ``SET_ASIDE.txt``; returns the new path.  Process 0 moves, all wait."""
    source = as_path(mngr.directory) / str(step)
    target_dir = as_path(mngr.directory).parent / SET_ASIDE
    target = target_dir / str(step)
    n = 1
    while target.exists():
        target, n = target_dir / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        (target / "SET_ASIDE.txt").write_text(reason + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"kindjax set aside {step}")
    mngr.reload()
    return str(target)


def restore_verified(mngr: ocp.CheckpointManager, abstract_state: dict,
                     check: Callable[[dict], None], report: Callable[[str], None]) -> tuple[dict, dict] | None:
    """The newest step that reads and matches its checksums, as ``(state, meta)``; None when the
    manager holds no step.  ``check(meta)`` may refuse a step (its error propagates: e.g. another
    model).  Each step that does not read, or whose arrays differ from their checksums, is
    reported through ``report`` in one line and moved aside (:func:`set_aside`); when none is
    left a :class:`CheckpointError` says so."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    problems = []
    for step in steps:
        problem, state, meta = None, None, None
        try:
            meta = read_meta(mngr, step)
        except Exception as e:  # noqa: BLE001 — any failure to read means: not this step
            problem = f"its metadata does not read ({_short(e)})"
        if _all_processes(problem is None):
            check(meta)
            try:
                state = restore(mngr, abstract_state, step)
            except Exception as e:  # noqa: BLE001
                problem = f"its arrays do not read ({_short(e)})"
        else:
            problem = problem or "its metadata does not read on another process"
        if _all_processes(problem is None) and "checksums" in meta:
            table, finite = checksums(state)
            changed = [path for item in STATE_ITEMS for path in differing(meta, item, table[item])]
            if changed:
                problem = f"its arrays differ from their checksums ({', '.join(changed[:3])})"
            elif not finite:
                problem = "it holds NaN or Inf"
        elif problem is None:
            problem = "its arrays do not read on another process"
        if problem is None:
            return state, meta
        moved = set_aside(mngr, step, f"step {step}: {problem}")
        report(f"Checkpoint step {step} is damaged: {problem}; moved to {moved}.")
        problems.append(step)
    raise CheckpointError(f"no checkpoint in {mngr.directory} reads and verifies: steps {problems} were moved to "
                          f"{as_path(mngr.directory).parent / SET_ASIDE}. Start over with "
                          f"another --workdir, or put back a good copy of a step.")


def restore_state_item(workdir: str, item: str, target: Any, config: ml_collections.ConfigDict,
                       step: int | None = None) -> tuple[Any, int]:
    """Item ``item`` (one of :data:`STATE_ITEMS`) of checkpoint ``step`` (default: the latest) of
    ``workdir``, restored onto ``target`` (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``),
    and its step.  Refuses a workdir without that step and a checkpoint of another model than
    ``config``'s."""
    mngr = manager(as_path(workdir) / CHECKPOINTS, read_only=True)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir} holds no checkpoint: train first (python -m kindjax.main) or "
                              f"give the workdir of a training run")
        if step not in mngr.all_steps():
            raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has {sorted(mngr.all_steps())}")
        meta = read_meta(mngr, step)
        check_same_model(meta["config"], config, workdir)
        restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
        return verify(meta, item, restored[item], f"{workdir} step {step}"), step
    finally:
        mngr.close()
