"""FINE's learngene: the shared singular vectors ``U``, ``V`` that initialise DiTs of other depths.

A FINE DiT (``config.model.linear.kind = "fine"``, :mod:`kindjax.papers.fine.layer`) keeps one ``U``
and one ``V`` per matrix type under ``fine_bases/`` and a ``Σ_l`` per layer.  After pre-training,
``fine_bases`` is the learngene (FINE Algorithm 1).  :func:`init_from_fine_learngene` builds a
FINE DiT of any depth ``L'`` from a source FINE model of depth ``L``:

- **U, V copied** (the paper's recipe: the target has the learngene's width and rank).
- **Σ of the new layers**, by ``init.fine_sigma`` (FINE Table 5; :func:`new_sigmas`):
  ``identical``: every layer the source's mean ``Σ`` over its layers; ``linear``: the source's
  first and last ``Σ`` interpolated over the new depth; ``random``: ``|z|·ρ`` with ``z ~ N(0, 1)``
  per entry and ``ρ`` the RMS of the source's ``Σ`` of that role (the source's scale, none of its
  arrangement); ``trained``: the same random draw, then the Σ-only stage of ``job="fine_init"``
  (:mod:`kindjax.train.stages`; the notes: "Σ_tgt is randomly initialised and then optimised alone");
  ``copy``: the source's own ``Σ_l`` (same depth: the second stage of that job).
- **The other leaves** (ours: the paper text at hand does not say): every per-block leaf other
  than ``Σ`` (the biases; the dense adaLN of the per-role layout) is the source's mean over its
  blocks (``copy``: the source block's own); the leaves outside the blocks (embedders, final
  layer) are copied.  Without them a zero-initialised final layer would give ``Σ`` no gradient.
  A leaf whose shape differs (another width or class count) stays as freshly initialised.
- **Width and rank changes** (an extension the paper does not describe, :func:`resize_factor`):
  *rows* of ``U``, ``V`` cropped to the first ``d'``, or extended with i.i.d. ``N(0, 1/d')`` rows;
  *columns* cropped to the first ``r'``, or extended orthonormally to the kept ones; ``Σ``
  cropped, or extended with the new model's init value.

:func:`materialize` turns a FINE tree into the dense DiT's (``W_l = U·diag(σ_l)·Vᵀ`` built
once, the fused qkv split into q, k, v): ``init.fine_learngene`` into a *dense* model does this.
:func:`per_layer_svd_init` is FINE's "w/o Factorize" ablation (Table 4): every layer of a
pre-trained dense DiT cut to its own top-``r`` SVD, nothing shared.

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
from kindjax.data.pipeline import Batches, StepBatches, TrainingSource
from kindjax.layers import ROLES
from kindjax.papers.fine.layer import BASES, LAYER_NAMES, layer_role
from kindjax.layers.svd import extend_orthonormal
from kindjax.checkpoints.learngene import load_params
from kindjax.models.dit import build_model, init_params

SIGMA = "sigma"
#: Module names of the FINE layers of a block (both layouts).
FINE_LAYERS = frozenset(ROLES) | {"qkv", *LAYER_NAMES.values()}
#: Module names of a dense DiT block's main matrices (the adaLN modulation included).
DENSE_MATRICES = frozenset(ROLES) | {"adaln_modulation"}


def is_fine_learngene(path: tuple) -> bool:
    """A shared factor ``fine_bases/<role>/{U,V}`` (also its optimizer-state leaves)."""
    return BASES in param_rules.path_names(path)


def is_layer_sigma(path: tuple) -> bool:
    """A FINE layer's own singular values ``block_<l>/.../<layer>/sigma``."""
    names = param_rules.path_names(path)
    return len(names) >= 2 and names[-1] == SIGMA and names[-2] in FINE_LAYERS and BASES not in names


def _block_index(key: tuple[str, ...]) -> int | None:
    return int(key[0][len("block_"):]) if key and key[0].startswith("block_") else None


def _flat(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(unfreeze(params))


def depth_of(params: Mapping[str, Any]) -> int:
    """The number of ``block_<l>`` sub-trees."""
    return sum(1 for k in params if _block_index((k,)) is not None)


def extract_fine_learngene(params: Mapping[str, Any]) -> dict:
    """The learngene of a FINE model: ``{"fine_bases": {role: {"U", "V"}}}`` and nothing else."""
    kept = {k: v for k, v in _flat(params).items() if BASES in k}
    if not kept:
        raise ValueError(f"these parameters hold no {BASES!r}: not a FINE model (model.linear.kind='fine')")
    return traverse_util.unflatten_dict(kept)


def layer_sigmas(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``role → (L, r)``: each block's ``Σ_l`` of that role, in block order (host float32)."""
    per_role: dict[str, dict[int, np.ndarray]] = {}
    for key, leaf in _flat(params).items():
        if is_layer_sigma(tuple(jax.tree_util.DictKey(k) for k in key)):
            per_role.setdefault(layer_role(key[-2]), {})[_block_index(key)] = np.asarray(leaf, np.float32)
    return {role: np.stack([s[i] for i in sorted(s)]) for role, s in per_role.items()}


def mean_sigma(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``role → mean_l Σ_l`` over the layers of a FINE model (host float32 arrays)."""
    return {role: s.mean(axis=0) for role, s in layer_sigmas(params).items()}


def new_sigmas(rule: str, source: np.ndarray, depth: int, key: jax.Array) -> np.ndarray:
    """``(L', r)`` Σ of the new layers from the source's ``(L, r)`` by ``init.fine_sigma`` (module doc).

    ``linear``: ``Σ'_l = Σ_1 + t_l·(Σ_L − Σ_1)`` with ``t_l = l/(L'−1)`` (``t = 1/2`` for ``L' = 1``).
    """
    if rule == "identical":
        return np.repeat(source.mean(axis=0, keepdims=True), depth, axis=0)
    if rule == "linear":
        t = np.linspace(0.0, 1.0, depth) if depth > 1 else np.array([0.5])
        return source[0] + t[:, None] * (source[-1] - source[0])
    if rule in ("random", "trained"):
        rms = float(np.sqrt(np.mean(np.square(source))))
        return rms * np.abs(np.asarray(jax.random.normal(key, (depth, source.shape[1]), jnp.float32)))
    if rule == "copy":
        if depth != source.shape[0]:
            raise ConfigError(f"init.fine_sigma='copy' keeps each source layer's Σ: the source has {source.shape[0]} "
                              f"blocks and this model {depth}; use 'identical', 'linear', 'random' or 'trained'")
        return source
    raise ConfigError(f"init.fine_sigma={rule!r}: use identical, linear, random, trained or copy")


def resize_factor(key: jax.Array, factor: jax.Array, rows: int, cols: int) -> jax.Array:
    """``factor (d, r)`` → ``(rows, cols)``: rows cropped or extended with ``N(0, 1/rows)`` rows,
    then columns cropped or extended orthonormally to the kept ones (our extension, module doc)."""
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


def init_from_fine_learngene(fresh_params: Mapping[str, Any], source_params: Mapping[str, Any], key: jax.Array,
                             fine_sigma: str = "identical") -> dict:
    """``fresh_params`` of a FINE DiT (any depth; another width or rank: our extension) initialised
    from the FINE model ``source_params`` (its whole tree: ``fine_bases``, per-layer ``Σ``, the rest)
    as the module docstring says; ``fine_sigma``: how the new layers' ``Σ`` are set."""
    if BASES not in fresh_params:
        raise ConfigError(f"init.fine_learngene initialises a FINE model, but this model has no {BASES!r}: "
                          f"set model.linear=ConfigDict(kind='fine', rank=...), or 'dense' to materialize")
    if BASES not in source_params:
        raise ValueError(f"the source parameters hold no {BASES!r}: not a FINE model")
    source_bases, target_bases = source_params[BASES], fresh_params[BASES]
    missing = sorted(set(target_bases) - set(source_bases))
    if missing:
        raise ValueError(f"the FINE learngene has no shared factors for roles {missing}; it holds "
                         f"{sorted(source_bases)} (another model.linear.layout?)")
    bases = {}
    for i, role in enumerate(sorted(target_bases)):
        k = jax.random.fold_in(key, i)
        bases[role] = {name: resize_factor(jax.random.fold_in(k, j), source_bases[role][name],
                                           *target_bases[role][name].shape)
                       for j, name in enumerate(("U", "V"))}
    depth = depth_of(fresh_params)
    sigmas = {role: new_sigmas(fine_sigma, s, depth, jax.random.fold_in(key, (1 << 16) + i))
              for i, (role, s) in enumerate(sorted(layer_sigmas(source_params).items()))}
    source = _flat(source_params)
    source_depth = depth_of(source_params)
    out = {}
    for key_path, leaf in _flat(fresh_params).items():
        block = _block_index(key_path)
        if BASES in key_path:
            continue
        if block is not None and is_layer_sigma(tuple(jax.tree_util.DictKey(k) for k in key_path)):
            s = sigmas[layer_role(key_path[-2])][block][:leaf.shape[0]]
            value = np.concatenate([s, np.asarray(leaf)[s.shape[0]:]])
        elif block is not None:
            rest = key_path[1:]
            found = [source.get((f"block_{i}",) + rest) for i in range(source_depth)]
            if any(f is None or f.shape != leaf.shape for f in found):
                out[key_path] = leaf
                continue
            value = found[block] if fine_sigma == "copy" else np.mean(np.stack(found), axis=0)
        else:
            value = source.get(key_path)
            if value is None or value.shape != leaf.shape:
                out[key_path] = leaf
                continue
        out[key_path] = jnp.asarray(value, leaf.dtype)
    params = traverse_util.unflatten_dict(out)
    return {**params, BASES: bases}


def materialize(fine_params: Mapping[str, Any], dense_fresh: Mapping[str, Any]) -> dict:
    """The dense DiT's tree (shaped as ``dense_fresh``) computing what ``fine_params`` computes:
    each FINE layer's kernel ``(d_in, d_out) = V diag(σ_l) Uᵀ`` (float64 product), the fused ``qkv``
    kernel and bias split into ``attn/q``, ``attn/k``, ``attn/v``; every other leaf copied."""
    bases = {role: {k: np.asarray(v, np.float64) for k, v in f.items()} for role, f in fine_params[BASES].items()}
    out = {}
    for key_path, leaf in _flat(fine_params).items():
        if BASES in key_path:
            continue
        layer, name = key_path[:-1], key_path[-1]
        if not (layer and layer[-1] in FINE_LAYERS and _block_index(key_path) is not None):
            out[key_path] = leaf
            continue
        if name == SIGMA:
            f = bases[layer_role(layer[-1])]
            value = ((f["V"] * np.asarray(leaf, np.float64)) @ f["U"].T).astype(np.float32)
            name = "kernel"
        else:
            value = np.asarray(leaf)
        if layer[-1] == "qkv":
            for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=-1)):
                out[layer[:-1] + (part, name)] = chunk
        else:
            out[layer + (name,)] = value
    dense = _flat(dense_fresh)
    if set(out) != set(dense):
        raise ConfigError(f"materializing the FINE model into this dense DiT: leaves differ "
                          f"({sorted('/'.join(k) for k in set(out) ^ set(dense))[:4]}); the two need the same "
                          f"depth, width and patch size")
    for key_path, leaf in dense.items():
        if tuple(np.shape(out[key_path])) != tuple(leaf.shape):
            raise ConfigError(f"materializing: {'/'.join(key_path)} is {np.shape(out[key_path])} in the FINE model "
                              f"but {tuple(leaf.shape)} in the dense one")
    return traverse_util.unflatten_dict({k: jnp.asarray(v, dense[k].dtype) for k, v in out.items()})


def top_singular(kernel: np.ndarray, rank: int) -> np.ndarray:
    """``P[:, :r] diag(s_:r) Q[:, :r]ᵀ``: the kernel's best rank-``r`` approximation (float64 SVD)."""
    p, s, qt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    if not 0 < rank <= s.size:
        raise ConfigError(f"init.svd_rank={rank} must be in [1, {s.size}] for a {kernel.shape} kernel")
    return ((p[:, :rank] * s[:rank]) @ qt[:rank]).astype(np.float32)


def source_block(target: int, target_depth: int, source_depth: int) -> int:
    """``round(l'·(L−1)/(L'−1))``: evenly spaced source blocks, first and last kept (``L' = 1``: the middle)."""
    if target_depth == 1:
        return (source_depth - 1) // 2
    return int(round(target * (source_depth - 1) / (target_depth - 1)))


def per_layer_svd_init(config: ml_collections.ConfigDict, fresh: Mapping[str, Any]) -> dict:
    """FINE's "w/o Factorize" (Table 4): ``fresh`` dense parameters of depth ``L'`` from the dense DiT at
    ``init.pretrained``: block ``l'`` from source block :func:`source_block`, each main matrix (q, k, v,
    attn_out, mlp_in, mlp_out, adaLN modulation) its own top ``init.svd_rank`` components, nothing shared
    across layers; other leaves copied (same shapes needed: the same width and classes)."""
    pretrained, _ = load_params(config.init.pretrained)
    source = _flat(pretrained)
    source_depth, depth = depth_of(pretrained), depth_of(fresh)
    out = {}
    for key_path, leaf in _flat(fresh).items():
        block = _block_index(key_path)
        src = key_path if block is None else (f"block_{source_block(block, depth, source_depth)}",) + key_path[1:]
        if src not in source:
            raise ConfigError(f"init.svd_rank: the pre-trained DiT has no {'/'.join(src)}; it must be a dense DiT "
                              f"(model.linear.kind='dense')")
        value = np.asarray(source[src])
        if block is not None and key_path[-1] == "kernel" and key_path[-2] in DENSE_MATRICES:
            value = top_singular(value, config.init.svd_rank)
        if value.shape != tuple(leaf.shape):
            raise ConfigError(f"init.svd_rank: {'/'.join(key_path)} is {value.shape} in the pre-trained DiT but "
                              f"{tuple(leaf.shape)} here; the two need the same width, patch size and classes")
        out[key_path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(out)


@dataclasses.dataclass(frozen=True, eq=False)
class FineLearngene:
    """FINE's learngene read from a checkpoint: ``bases`` = ``{"fine_bases": {role: {U, V}}}``,
    ``sigma`` = ``role → mean_l Σ_l``, ``params`` = the source's whole tree (host arrays; the
    initialisation also reads its per-layer ``Σ`` and the leaves around them), its config and source."""

    bases: dict
    sigma: dict[str, np.ndarray]
    params: dict
    config: ml_collections.ConfigDict
    source: checkpoints.Source


def load_fine_learngene(path: str | epath.PathLike, *, step: int | None = None, ema: bool = True) -> FineLearngene:
    """The FINE model at ``path`` (a training workdir, a step directory or a sliced learngene; ``step``
    and ``ema`` as in :func:`kindjax.load_learngene`).  A checkpoint written before
    ``model.linear.layout`` existed has the ``"per_role"`` layout; its config says so once read."""
    located = checkpoints.locate(path, step)
    source = checkpoints.source(located, ema)
    config = checkpoints.config_of(located)
    if config.model.linear.kind != "fine":
        raise ConfigError(f"{located.directory} holds a model.linear.kind={config.model.linear.kind!r} model, "
                          f"not FINE: init.fine_learngene needs a checkpoint of a FINE model (kind='fine')")
    if "layout" not in config.model.linear:
        config.model.linear.layout = "per_role"
    checkpoints.check_part(located, "learngene")
    item = "learngene" if located.kind == "sliced" else source.item
    params = unfreeze(checkpoints.restore_item(located, item))
    return FineLearngene(extract_fine_learngene(params), mean_sigma(params), params, config, source)


def init_from_config(config: ml_collections.ConfigDict, fresh_params: Mapping[str, Any], key: jax.Array) -> dict:
    """``fresh_params`` initialised from the FINE model at ``config.init.fine_learngene`` with
    ``init.fine_sigma`` (:func:`init_from_fine_learngene`); a dense target gets the FINE twin of its
    size (the source's ``model.linear``) initialised so, then :func:`materialize`\\ d."""
    others = [k for k in ("learngene", "pretrained") if config.init.get(k)]
    if others:
        raise ConfigError(f"init.fine_learngene and init.{others[0]} are two different starts: set one of them")
    learngene = load_fine_learngene(config.init.fine_learngene)
    rule = config.init.get("fine_sigma", "identical")
    if config.model.linear.kind != "dense" or BASES in fresh_params:
        return init_from_fine_learngene(fresh_params, learngene.params, key, rule)
    twin = config.model.copy_and_resolve_references()
    twin.linear = learngene.config.model.linear
    twin_model = build_model(twin)
    fine_fresh = jax.jit(lambda k: init_params(k, twin_model))(jax.random.fold_in(key, 1))
    return materialize(init_from_fine_learngene(fine_fresh, learngene.params, key, rule), fresh_params)


class LimitedData:
    """A :class:`TrainingSource` that sees only the first ``batches`` batches of ``dataset``'s data order,
    cycled: step ``s`` is step ``s mod batches`` of ``dataset`` (the Σ-only stage's "limited data")."""

    def __init__(self, dataset: TrainingSource, batches: int):
        if batches < 1:
            raise ValueError(f"LimitedData needs at least one batch, got {batches}")
        self.dataset, self.limit, self.num_classes = dataset, batches, dataset.num_classes

    def local_batch(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> dict[str, np.ndarray]:
        return self.dataset.local_batch(step % self.limit, batch_size, seed, process_index, process_count)

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        return self.local_batch(step, batch_size, seed)

    def batches(self, start_step: int, batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> Batches:
        return StepBatches(lambda step: self.local_batch(step, batch_size, seed, process_index, process_count),
                           start_step)
