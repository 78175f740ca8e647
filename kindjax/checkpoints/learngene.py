"""Load a learngene, or the tailors of a few classes, and assemble a model for those classes.

A checkpoint path is any of: a training workdir (``DIR/checkpoints/<step>/``, the
latest step unless ``step`` is given), one step directory of it, a directory
written by ``python -m kindjax.tools.slice``, or one written by ``python -m kindjax.tools.export
--format safetensors`` (safetensors files and a ``learngene.json`` card; each file's SHA-256 is
checked against the card before it is read).  Orbax reads are partial restores into host
numpy arrays: only the arrays of the requested part are read, and the devices (or
sharding) of the training run are not needed.

Which leaves belong to which part follows :mod:`kindjax.params`: the learngene is
every non-tailor leaf plus the null row of the label table; the tailors of class
``c`` are row ``c`` of every tailor leaf and of the label table.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.checkpoints import Source
from kindjax.config import differences
from kindjax.layers import VARIANTS
from kindjax.models.dit import DiT, build_model


@dataclasses.dataclass(frozen=True, eq=False)
class Learngene:
    """The class-agnostic part of a model (nested dict of host arrays) and its config."""

    params: dict
    config: ml_collections.ConfigDict
    source: Source


@dataclasses.dataclass(frozen=True, eq=False)
class Tailors:
    """Tailor leaves and label rows of ``classes`` (original ids), in that order."""

    params: dict
    classes: tuple[int, ...]
    config: ml_collections.ConfigDict
    source: Source


@dataclasses.dataclass(frozen=True, eq=False)
class Assembled:
    """A DiT for ``len(classes)`` classes: label ``i`` is original class ``classes[i]``,
    label ``len(classes)`` the null class."""

    model: DiT
    params: dict
    classes: tuple[int, ...]
    config: ml_collections.ConfigDict

    def labels(self, original: Iterable[int]) -> np.ndarray:
        """The model's labels for original class ids (each must be one of ``classes``)."""
        index = {c: i for i, c in enumerate(self.classes)}
        missing = sorted({int(c) for c in original} - set(index))
        if missing:
            raise ValueError(f"classes {missing} are not in this model, which has {self.classes}")
        return np.asarray([index[int(c)] for c in original], np.int32)


def load_learngene(path: str | epath.PathLike, *, step: int | None = None, ema: bool = True) -> Learngene:
    """The learngene of the checkpoint at ``path``; reads no tailor leaf.

    ``step`` picks a step of a workdir (default: the latest); ``ema`` reads the EMA
    weights (default) or the raw ones.  Both are fixed for a sliced checkpoint.
    """
    located = checkpoints.locate(path, step)
    source = checkpoints.source(located, ema)
    checkpoints.check_part(located, "learngene")
    kind = located.meta["config"]["model"]["linear"]["kind"]
    if not VARIANTS[kind].tailored:
        tailored = sorted(name for name, variant in VARIANTS.items() if variant.tailored)
        raise ValueError(f"{located.directory} holds a {kind!r} DiT (model.linear.kind={kind!r}), whose layers have no "
                         f"tailors: it has no learngene to read apart. Give the workdir of a model with tailors "
                         f"(model.linear.kind in {tailored}), or start from its weights with init.pretrained.")
    if located.kind in ("sliced", "exported"):
        params = checkpoints.restore_item(located, "learngene")
    else:
        params, _ = param_rules.split_learngene_tailors(
            checkpoints.restore_item(located, source.item, lambda p: not param_rules.is_tailor(p)))
    return Learngene(params, checkpoints.config_of(located), source)


def load_params(path: str | epath.PathLike, *, step: int | None = None,
                ema: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
    """Every parameter of the training checkpoint at ``path`` (host arrays) and its config;
    ``step`` and ``ema`` as in :func:`load_learngene`.  A sliced checkpoint holds one part only."""
    located = checkpoints.locate(path, step)
    if located.kind in ("sliced", "exported"):
        raise ValueError(f"{located.directory} is a {located.kind} checkpoint (a learngene and tailors, not every "
                         f"parameter); give the training workdir it came from: {located.meta['source']['checkpoint']}")
    item = checkpoints.source(located, ema).item
    return checkpoints.restore_item(located, item), checkpoints.config_of(located)


def _check_classes(classes: Sequence[int], available: Sequence[int], where: str) -> tuple[int, ...]:
    classes = tuple(int(c) for c in classes)
    if not classes:
        raise ValueError("classes is empty: give at least one class id")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} has repeated ids")
    missing = [c for c in classes if c not in available]
    if missing:
        raise ValueError(f"classes {missing} are out of range: {where}")
    return classes


def load_tailors(path: str | epath.PathLike, classes: Sequence[int], *, step: int | None = None,
                 ema: bool = True) -> Tailors:
    """The tailors of ``classes`` (original class ids) of the checkpoint at ``path``.

    Reads the tailor leaves and the label table only (whole arrays; the rows of
    ``classes`` are kept), never a learngene leaf.  ``step`` and ``ema`` as in
    :func:`load_learngene`.
    """
    located = checkpoints.locate(path, step)
    config, source = checkpoints.config_of(located), checkpoints.source(located, ema)
    checkpoints.check_part(located, "tailors")
    if located.kind in ("sliced", "exported"):
        available = tuple(located.meta["tailor_classes" if located.kind == "exported" else "classes"])
        classes = _check_classes(classes, available,
                                 f"the {located.kind} tailors at {located.directory} hold classes {available}")
        bundle = checkpoints.restore_item(located, "tailors")
    else:
        n = config.model.num_classes
        classes = _check_classes(classes, range(n), f"the model of {located.directory} has classes "
                                                    f"0..{n - 1} (model.num_classes={n})")
        available = tuple(range(n))
        _, bundle = param_rules.split_learngene_tailors(checkpoints.restore_item(located, source.item, param_rules.has_class_rows))
        if not any(param_rules.is_tailor(p) for p, _ in jax.tree_util.tree_leaves_with_path(bundle)):
            raise ValueError(f"the model of {located.directory} has no tailors (model.linear.kind="
                             f"{config.model.linear.kind!r}); load_learngene reads all its parameters")
    rows = np.asarray([available.index(c) for c in classes])
    params = jax.tree.map(lambda leaf: np.asarray(leaf)[rows], bundle)
    return Tailors(params, classes, config, source)


def _model_json(config: ml_collections.ConfigDict) -> dict:
    """The model config as JSON data, without the class counts (set by :func:`assemble`)."""
    model = checkpoints.config_json(config)["model"]
    model.pop("num_classes")
    return model


def _check_same_model(learngene: Learngene, tailors: Tailors) -> None:
    diffs = differences(_model_json(learngene.config), _model_json(tailors.config), ("learngene ", "tailors "),
                        "model.")
    if diffs:
        detail = ", ".join(diffs)
        raise ValueError(f"the learngene ({learngene.source.path}) and the tailors ({tailors.source.path}) "
                         f"come from different models: {detail}")


def _class_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    config.model.num_classes = k
    return config


def assemble(learngene: Learngene, tailors: Tailors, *, verbose: bool = True) -> Assembled:
    """The deployable DiT for ``tailors.classes``, relabelled ``0..k-1`` in that order.

    The null class ``k`` uses the learngene alone.  The two parts must come from the
    same model config (up to the number of classes).  Prints the parameter counts
    per part when ``verbose``.
    """
    _check_same_model(learngene, tailors)
    k = len(tailors.classes)
    config = _class_config(tailors.config, k)
    params = jax.tree.map(jnp.asarray, param_rules.merge_learngene_tailors(learngene.params, tailors.params))
    if verbose:
        print(_summary(learngene, tailors))
    return Assembled(build_model(config), params, tailors.classes, config)


def _summary(learngene: Learngene, tailors: Tailors) -> str:
    k, n_full = len(tailors.classes), tailors.config.model.num_classes
    n_g, n_t = param_rules.count(learngene.params), param_rules.count(tailors.params)
    full = n_g + n_t // k * n_full
    return (f"Assembled a DiT for classes {list(tailors.classes)} (labels 0..{k - 1}, null class {k}):\n"
            f"  learngene {n_g:>12,}\n"
            f"  tailors   {n_t:>12,}  ({k} classes × {n_t // k:,})\n"
            f"  total     {n_g + n_t:>12,}  = {100 * (n_g + n_t) / full:.1f}% of the full "
            f"{n_full}-class model ({full:,})")

