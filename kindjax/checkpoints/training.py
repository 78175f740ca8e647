"""The training layout: Orbax ``CheckpointManager`` with one item per part of the train state.

Layout of ``WORKDIR/checkpoints/<step>/``:
  ``params``, ``ema_params``, ``opt_state`` — PyTree items (OCDBT), each restorable
  alone, and any sub-tree of them by a partial restore;
  ``meta`` — JSON: ``step`` and the full ``config`` (the model config is what a
  reader needs to rebuild the model).
The data position and the PRNG position of a run are its step (batches and keys
are pure functions of ``(seed, step)``), so the step restores both.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from kindjax.checkpoints.layout import CHECKPOINTS, META, read_meta
from kindjax.config import ConfigError

STATE_ITEMS = ("params", "ema_params", "opt_state")


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(config.to_json())


def manager(directory: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of the step directories under ``directory`` (``WORKDIR/checkpoints``),
    keeping the last ``keep`` steps."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only),
        item_names=STATE_ITEMS + (META,))


def save(mngr: ocp.CheckpointManager, state: dict, config: ml_collections.ConfigDict) -> None:
    """Saves the train state at ``state['step']`` (asynchronously; see ``mngr.wait_until_finished``)."""
    step = int(state["step"])
    items = {name: ocp.args.StandardSave(state[name]) for name in STATE_ITEMS}
    mngr.save(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonSave({"step": step, "config": config_json(config)})}, **items), force=True)


def check_same_model(saved_config: dict, config: ml_collections.ConfigDict, directory: str) -> None:
    """Refuses to resume a checkpoint written for another model config."""
    saved, now = saved_config["model"], config_json(config)["model"]
    if saved != now:
        diffs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"{directory} holds a checkpoint of a different model ({detail}). Use another --workdir, "
            f"or run with the config that wrote it.")


def restore(mngr: ocp.CheckpointManager, abstract_state: dict, step: int | None = None) -> dict:
    """Restores the full train state onto the shardings given by ``abstract_state``
    (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``)."""
    step = mngr.latest_step() if step is None else step
    items = {name: ocp.args.StandardRestore(abstract_state[name]) for name in STATE_ITEMS}
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    state = {name: restored[name] for name in STATE_ITEMS}
    state["step"] = jax.device_put(step, abstract_state["step"].sharding)
    return state


def restore_state_item(workdir: str, item: str, target: Any, config: ml_collections.ConfigDict,
                       step: int | None = None) -> tuple[Any, int]:
    """Item ``item`` (one of :data:`STATE_ITEMS`) of checkpoint ``step`` (default: the latest) of
    ``workdir``, restored onto ``target`` (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``),
    and its step.  Refuses a workdir without that step and a checkpoint of another model than
    ``config``'s."""
    mngr = manager(os.path.join(workdir, CHECKPOINTS), read_only=True)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir} holds no checkpoint: train first (python -m kindjax.main) or "
                              f"give the workdir of a training run")
        if step not in mngr.all_steps():
            raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has {sorted(mngr.all_steps())}")
        check_same_model(read_meta(mngr, step)["config"], config, workdir)
        restored = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
        return restored[item], step
    finally:
        mngr.close()
