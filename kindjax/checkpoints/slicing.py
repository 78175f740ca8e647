"""The sliced layout: the learngene, or the tailors of some classes, as a standalone checkpoint.

A sliced directory holds two Orbax items: ``learngene`` or ``tailors`` (the part's PyTree) and
``meta`` (JSON: the part, the classes, the step, the source, the size, the full config and the
part's checksums, verified on every read).
It is read by :func:`kindjax.load_learngene` / :func:`kindjax.load_tailors`; the command line
is ``python -m kindjax.tools.slice``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kindjax import params as param_rules
from kindjax.checkpoints.integrity import tree_checksums
from kindjax.checkpoints.layout import META, PARTS
from kindjax.checkpoints.training import config_json
from kindjax.io.paths import as_path, disk_bytes, refuse_existing
from kindjax.checkpoints.learngene import load_learngene, load_tailors


def _is_sliced(out: epath.Path) -> bool:
    """``force`` replaces an earlier sliced checkpoint (or an empty directory: :func:`refuse_existing`)."""
    return (out / META).is_dir() and any((out / part).is_dir() for part in PARTS)


def slice_checkpoint(path: str | os.PathLike, out: str | os.PathLike, part: str,
                     classes: Sequence[int] | None = None, *, step: int | None = None,
                     ema: bool = True, force: bool = False) -> dict[str, Any]:
    """Writes ``part`` of the checkpoint at ``path`` to ``out``; returns the metadata written.

    ``classes`` (original ids) is required for ``part='tailors'`` and refused for the
    learngene.  Refuses an existing ``out`` unless ``force``.
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r}: use one of {PARTS}")
    if (part == "tailors") != (classes is not None):
        raise ValueError("the tailors part needs classes (e.g. --classes 0,3,7); the learngene part takes none")
    out = as_path(out)
    refuse_existing(out, force, _is_sliced, "a sliced checkpoint")
    bundle = load_learngene(path, step=step, ema=ema) if part == "learngene" else \
        load_tailors(path, classes, step=step, ema=ema)
    source, leaves = bundle.source, jax.tree.leaves(bundle.params)
    meta = {"part": part,
            "classes": list(bundle.classes) if part == "tailors" else None,
            "step": source.step,
            "source": {"path": source.path, "checkpoint": source.checkpoint, "item": source.item},
            "size": {"arrays": len(leaves), "parameters": param_rules.count(bundle.params),
                     "bytes": sum(int(np.asarray(x).nbytes) for x in leaves)},
            "config": config_json(bundle.config),
            "checksums": tree_checksums({part: bundle.params})[0]}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(out, args=ocp.args.Composite(**{
        part: ocp.args.PyTreeSave(bundle.params), META: ocp.args.JsonSave(meta)}), force=force)
    return meta


def describe(out: str | os.PathLike, meta: dict[str, Any]) -> str:
    """What :func:`slice_checkpoint` wrote: arrays, parameters, bytes in memory and on disk."""
    size = meta["size"]
    disk = disk_bytes(out)
    what = "the learngene" if meta["part"] == "learngene" else f"the tailors of classes {meta['classes']}"
    return (f"Wrote {what} of {meta['source']['checkpoint']} (step {meta['step']}, "
            f"{meta['source']['item']}) to {out}:\n"
            f"  {size['arrays']} arrays, {size['parameters']:,} parameters, "
            f"{size['bytes'] / 2**20:.3f} MiB in memory, "
            f"{disk / 2**20:.3f} MiB on disk")
