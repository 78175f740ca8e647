"""The read side of every checkpoint directory: locate one, read its metadata and its arrays.

Four kinds of directory hold weights:
  ``workdir``: a training workdir, ``DIR/checkpoints/<step>/`` (:mod:`.training`);
  ``step``: one ``<step>/`` directory of it (items ``params``, ``ema_params``, ``opt_state``, ``meta``);
  ``sliced``: written by :func:`kindjax.checkpoints.slicing.slice_checkpoint`, items ``learngene``
  or ``tailors`` (one of :data:`PARTS`) and ``meta``;
  ``exported``: safetensors files of :data:`PARTS` and a JSON card that lists their SHA-256
  (:mod:`.tensorfiles`; written by ``python -m kindjax.tools.export --format safetensors``).
Every ``meta`` item (an exported directory: its card) is JSON with at least ``step`` and the full
``config``; an Orbax ``meta`` also holds the ``checksums`` of its arrays (:mod:`.integrity`;
checked on every read).  Orbax arrays are read by partial restores into host numpy arrays: only the requested
leaves are read, and the devices (or sharding) that wrote them are not needed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from kindjax.checkpoints import tensorfiles
from kindjax.checkpoints.integrity import verify
from kindjax.io.paths import as_path, read_json

#: The JSON item of every checkpoint (step, config; a sliced one adds its part and source).
META = "meta"
#: The parts a sliced checkpoint may hold (one each).
PARTS = ("learngene", "tailors")
#: The sub-directory of a training workdir that holds its step directories.
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a part was read from.

    ``path``: the directory that was read; ``kind``: ``workdir``, ``step`` or ``sliced``;
    ``checkpoint``: the training step directory the weights come from; ``step``: its
    step; ``item``: ``ema_params`` or ``params``.
    """

    path: str
    kind: str
    checkpoint: str
    step: int
    item: str


@dataclasses.dataclass(frozen=True)
class Located:
    """A checkpoint directory to read (a step directory or a sliced one), how it was named
    (``kind``: ``workdir``, ``step`` or ``sliced``) and its metadata."""

    directory: epath.Path
    kind: str
    meta: dict


def read_meta(checkpoint: ocp.CheckpointManager | epath.PathLike, step: int | None = None) -> dict:
    """The ``meta`` JSON of step ``step`` (default: the latest) of a manager, or of a step or
    sliced checkpoint directory (``step`` unused)."""
    if isinstance(checkpoint, ocp.CheckpointManager):
        step = checkpoint.latest_step() if step is None else step
        return checkpoint.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        epath.Path(checkpoint), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]


def locate(path: epath.PathLike, step: int | None = None) -> Located:
    """Resolves a workdir (its step ``step``, default the latest), a step directory or a sliced
    checkpoint to the directory to read; refuses a ``step`` that the path does not hold."""
    directory = as_path(path)
    has_meta = (directory / META).is_dir()
    if tensorfiles.is_exported(directory):
        located = Located(directory, "exported", read_json(directory / tensorfiles.CARD))
    elif has_meta and any((directory / part).is_dir() for part in PARTS):
        located = Located(directory, "sliced", read_meta(directory))
    elif has_meta and (directory / "params").is_dir():
        located = Located(directory, "step", read_meta(directory))
    elif (directory / CHECKPOINTS).is_dir():
        root = directory / CHECKPOINTS
        steps = sorted(ocp.utils.checkpoint_steps(root))
        if not steps:
            raise FileNotFoundError(f"{root} holds no finished checkpoint")
        if step is not None and step not in steps:
            raise ValueError(f"{directory} has no checkpoint at step {step}; it has steps {steps}")
        found = ocp.step.find_step_path(root, ocp.step.standard_name_format(),
                                        step=steps[-1] if step is None else step)
        return Located(found, "workdir", read_meta(found))
    else:
        raise FileNotFoundError(
            f"{directory} holds no kindjax checkpoint: expected a training workdir (with "
            f"checkpoints/<step>/), a step directory (with meta/ and params/), or a directory "
            f"written by python -m kindjax.tools.slice or python -m kindjax.tools.export --format safetensors")
    if step is not None and step != located.meta["step"]:
        raise ValueError(f"{directory} holds step {located.meta['step']} only, not step {step}")
    return located


def source(located: Located, ema: bool) -> Source:
    """Where the weights of ``located`` come from; ``ema`` picks ``ema_params`` or ``params`` of a
    training checkpoint (a sliced one holds the item it was sliced from)."""
    meta = located.meta
    if located.kind in ("sliced", "exported"):
        return Source(str(located.directory), located.kind, meta["source"]["checkpoint"], meta["step"],
                      meta["source"]["item"])
    item = "ema_params" if ema else "params"
    return Source(str(located.directory), located.kind, str(located.directory), meta["step"], item)


def check_part(located: Located, part: str) -> None:
    """Refuses a sliced checkpoint that holds the other part than ``part``, or an exported one without
    ``part`` (a training checkpoint holds both)."""
    if located.kind == "exported" and tensorfiles.part_file(part) not in located.meta["files"]:
        raise ValueError(f"{located.directory} holds {sorted(located.meta['files'])}, not the {part}: export it "
                         f"with the {part} (python -m kindjax.tools.export --format safetensors"
                         + (" --classes 0,3,7)" if part == "tailors" else ")"))
    if located.kind == "sliced" and located.meta["part"] != part:
        raise ValueError(f"{located.directory} holds the {located.meta['part']} only, not the {part}; "
                         f"read the {part} from {located.meta['source']['checkpoint']}, where it was sliced from")


def config_of(located: Located) -> ml_collections.ConfigDict:
    """The full config of the run that wrote ``located``."""
    return ml_collections.ConfigDict(located.meta["config"])


def _everything(path: tuple) -> bool:
    return True


def restore_leaves(item_dir: epath.PathLike, keep: Callable[[tuple], bool] = _everything) -> dict[str, Any]:
    """The leaves of the PyTree item at ``item_dir`` whose key path satisfies ``keep``, as numpy
    arrays in nested dicts; no other leaf is read (Orbax partial restore)."""
    item_dir = epath.Path(item_dir)
    saved = traverse_util.flatten_dict(ocp.PyTreeCheckpointHandler().metadata(item_dir).tree)
    keys = [k for k in saved if keep(tuple(jax.tree_util.DictKey(name) for name in k))]
    item = traverse_util.unflatten_dict({k: 0 for k in keys})
    restore_args = traverse_util.unflatten_dict({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys})
    return ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))


def restore_item(located: Located, item: str, keep: Callable[[tuple], bool] = _everything) -> dict[str, Any]:
    """:func:`restore_leaves` of item ``item`` (``params``, ``ema_params``, or a part of
    :data:`PARTS`) of ``located``, verified: an Orbax item against the checksums of its ``meta``
    (:func:`kindjax.checkpoints.integrity.verify`: a mismatch is a one-line refusal), the part of an
    exported directory read whole with its hash checked (:func:`tensorfiles.read_part`), then cut to
    ``keep``.  Every read of weights outside training goes through here."""
    if located.kind == "exported":
        flat = traverse_util.flatten_dict(tensorfiles.read_part(located.directory, item, located.meta))
        return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                             if keep(tuple(jax.tree_util.DictKey(name) for name in k))})
    return verify(located.meta, item, restore_leaves(located.directory / item, keep), str(located.directory))
