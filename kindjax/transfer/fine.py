"""FINE's learngene: the shared singular vectors ``U``, ``V`` that initialise DiTs of other sizes.

A FINE DiT (``config.model.linear.kind = "fine"``, :mod:`kindjax.layers.fine`) keeps
one ``U`` and one ``V`` per matrix kind under ``fine_bases/`` and a ``Σ_l`` per
layer.  After training, ``fine_bases`` is the learngene (FINE Algorithm 1): it
initialises a new FINE DiT of another depth, width and/or rank:

- **U, V copied**, reshaped to the new ``(d, r')`` of each role:
  *rows* (the width ``d``): cropped to the first ``d'`` when narrower; when wider,
  extended with i.i.d. ``N(0, 1/d')`` rows, the entry scale of a ``d'×r`` factor with
  orthonormal columns at init (the copied rows are kept exactly, so the old block of
  every ``W`` is unchanged; the columns are then close to, not exactly, orthonormal —
  a trained factor is not orthonormal either).
  *columns* (the rank ``r``): cropped to the first ``r'``; when ``r' > r``, extended with
  random columns orthonormal to the copied ones (Gram–Schmidt of Gaussian columns,
  :func:`kindjax.layers.kind.extend_orthonormal`).
- **Σ per layer**: the learngene says nothing about depth, so every layer of the new
  model gets the same ``Σ``: the mean over the source's layers of that role's ``Σ``
  (``sigma=`` of :func:`init_from_fine_learngene`; :func:`load_fine_learngene` reads
  it), cropped to ``r'`` or extended with the new model's init value; without it,
  ``Σ`` stays as freshly initialised.
- Every other leaf (embedders, adaLN, biases, final layer) stays as freshly initialised.

Path rule: a leaf is FINE learngene iff a ``fine_bases`` component is in its path
(:func:`is_fine_learngene`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from flax.core import unfreeze

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.config import ConfigError
from kindjax.layers import ROLES
from kindjax.layers.fine import BASES
from kindjax.layers.kind import extend_orthonormal

SIGMA = "sigma"


def is_fine_learngene(path: tuple) -> bool:
    """A shared factor ``fine_bases/<role>/{U,V}`` (also its optimizer-state leaves)."""
    return BASES in param_rules.path_names(path)


def is_layer_sigma(path: tuple) -> bool:
    """A FINE layer's own singular values ``block_<l>/.../<role>/sigma``."""
    names = param_rules.path_names(path)
    return len(names) >= 2 and names[-1] == SIGMA and names[-2] in ROLES and BASES not in names


def _flat(params: Mapping[str, Any]) -> dict[tuple, Any]:
    """``{key path (jax.tree_util.DictKey, ...): leaf}`` of a nested parameter dict."""
    flat = traverse_util.flatten_dict(unfreeze(params))
    return {tuple(jax.tree_util.DictKey(k) for k in key): leaf for key, leaf in flat.items()}


def extract_fine_learngene(params: Mapping[str, Any]) -> dict:
    """The learngene of a FINE model: ``{"fine_bases": {role: {"U", "V"}}}`` and nothing else."""
    kept = {param_rules.path_names(path): v for path, v in _flat(params).items() if is_fine_learngene(path)}
    if not kept:
        raise ValueError(f"these parameters hold no {BASES!r}: not a FINE model (model.linear.kind='fine')")
    return traverse_util.unflatten_dict(kept)


def mean_sigma(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``role → mean_l Σ_l`` over the layers of a FINE model (host float32 arrays)."""
    per_role: dict[str, list[np.ndarray]] = {}
    for path, leaf in _flat(params).items():
        if is_layer_sigma(path):
            per_role.setdefault(param_rules.path_names(path)[-2], []).append(np.asarray(leaf, np.float32))
    return {role: np.mean(np.stack(s), axis=0) for role, s in per_role.items()}


def resize_factor(key: jax.Array, factor: jax.Array, rows: int, cols: int) -> jax.Array:
    """``factor (d, r)`` → ``(rows, cols)``: rows cropped or extended with ``N(0, 1/rows)`` rows,
    then columns cropped or extended orthonormally to the kept ones (see the module docstring)."""
    if cols > rows:
        raise ValueError(f"a ({rows}, {cols}) factor cannot have orthonormal columns: rank {cols} > width {rows}")
    key_rows, key_cols = jax.random.split(key)
    f = jnp.asarray(factor, jnp.float32)[:rows, :cols]
    if rows > f.shape[0]:
        extra = jax.random.normal(key_rows, (rows - f.shape[0], f.shape[1]), jnp.float32) / np.sqrt(rows)
        f = jnp.concatenate([f, extra], axis=0)
    if cols > f.shape[1]:
        f = jnp.concatenate([f, extend_orthonormal(key_cols, f, cols - f.shape[1])], axis=1)
    return f


def init_from_fine_learngene(fresh_params: Mapping[str, Any], learngene: Mapping[str, Any], key: jax.Array,
                             sigma: Mapping[str, Any] | None = None) -> dict:
    """``fresh_params`` of a FINE DiT (any depth, width, rank) with ``U``, ``V`` from ``learngene``.

    ``learngene``: ``{"fine_bases": {role: {"U", "V"}}}`` (:func:`extract_fine_learngene`).
    ``sigma``: optional ``role → Σ`` (e.g. :func:`mean_sigma` of the source) given to every
    layer, cropped or extended with the fresh init value; ``None`` keeps the fresh ``Σ``.
    """
    if BASES not in fresh_params:
        raise ConfigError(f"init.fine_learngene initialises a FINE model, but this model has no {BASES!r}: "
                          f"set model.linear=ConfigDict(kind='fine', rank=...)")
    source, target = learngene[BASES], fresh_params[BASES]
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"the FINE learngene has no shared factors for roles {missing}; it holds {sorted(source)}")
    bases = {}
    for i, role in enumerate(sorted(target)):
        k = jax.random.fold_in(key, i)
        bases[role] = {name: resize_factor(jax.random.fold_in(k, j), source[role][name], *target[role][name].shape)
                       for j, name in enumerate(("U", "V"))}

    def layer_sigma(path: tuple, leaf: jax.Array) -> jax.Array:
        if sigma is None or not is_layer_sigma(path):
            return leaf
        s = jnp.asarray(sigma[param_rules.path_names(path)[-2]], jnp.float32)[:leaf.shape[0]]
        return jnp.concatenate([s, leaf[s.shape[0]:]]).astype(leaf.dtype)

    params = param_rules.map_with_path(layer_sigma, unfreeze(fresh_params))
    return {**params, BASES: bases}


@dataclasses.dataclass(frozen=True, eq=False)
class FineLearngene:
    """FINE's learngene read from a checkpoint: ``bases`` = ``{"fine_bases": {role: {U, V}}}``
    (host arrays), ``sigma`` = ``role → mean_l Σ_l`` of the source, its config and source."""

    bases: dict
    sigma: dict[str, np.ndarray]
    config: ml_collections.ConfigDict
    source: checkpoints.Source


def load_fine_learngene(path: str | epath.PathLike, *, step: int | None = None, ema: bool = True) -> FineLearngene:
    """The shared ``U``, ``V`` (and the per-role mean ``Σ``) of the FINE checkpoint at ``path``.

    ``path``: a training workdir, a step directory or a sliced learngene; ``step`` and ``ema``
    as in :func:`kindjax.load_learngene`.  An Orbax partial restore: no other leaf is read.
    """
    located = checkpoints.locate(path, step)
    source = checkpoints.source(located, ema)
    config = checkpoints.config_of(located)
    if config.model.linear.kind != "fine":
        raise ConfigError(f"{located.directory} holds a model.linear.kind={config.model.linear.kind!r} model, "
                          f"not FINE: init.fine_learngene needs a checkpoint of a FINE model (kind='fine')")
    checkpoints.check_part(located, "learngene")
    item = "learngene" if located.kind == "sliced" else source.item
    params = checkpoints.restore_item(located, item, lambda p: is_fine_learngene(p) or is_layer_sigma(p))
    return FineLearngene(extract_fine_learngene(params), mean_sigma(params), config, source)


def init_from_config(config: ml_collections.ConfigDict, fresh_params: Mapping[str, Any], key: jax.Array) -> dict:
    """``fresh_params`` initialised from the FINE learngene at ``config.init.fine_learngene``
    (shared factors copied and resized, every layer's Σ the source's mean Σ)."""
    others = [k for k in ("learngene", "pretrained") if config.init.get(k)]
    if others:
        raise ConfigError(f"init.fine_learngene and init.{others[0]} are two different starts: set one of them")
    learngene = load_fine_learngene(config.init.fine_learngene)
    return init_from_fine_learngene(fresh_params, learngene.bases, key, sigma=learngene.sigma)
