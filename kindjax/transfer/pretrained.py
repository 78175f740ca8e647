"""``init.pretrained``: a new model of any variant that starts from a pre-trained DiT (the baselines).

Every leaf
whose path and shape the new model shares is copied; a linear layer's kernel comes
from the source's dense kernel or the learngene part of a factorised layer
(``W = V_G diag(σ_G) U_Gᵀ``), optionally cut to ``init.svd_components`` random singular
components (an ablation of the learngene: random components instead of learnt ones); ``init.blocks`` limits the copy to some DiT blocks (the layer-transfer
learngenes Heur-LG and Auto-LG, :mod:`kindjax.transfer.layer_selection`); the new classes get
fresh label rows; finally the variant's data-dependent initialisation
(``Variant.from_dense`` of :mod:`kindjax.layers`: PiSSA's and SVDiff's SVD, DoRA's magnitude) runs on
every linear layer.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from kindjax import params as param_rules
from kindjax.config import ConfigError
from kindjax.layers import ROLES, VARIANTS
from kindjax.checkpoints.learngene import load_params
from kindjax.models.dit import DiT, build_model
from kindjax.transfer.layer_selection import select_blocks

def dense_kernel(node: Mapping[str, Any]) -> np.ndarray:
    """The ``(d_in, d_out)`` kernel a pre-trained linear layer computes with: its ``kernel``,
    or a factorised layer's learngene product ``V_G diag(σ_G) U_Gᵀ`` (tailors left out)."""
    if "kernel" in node:
        return np.asarray(node["kernel"], np.float32)
    if "learngene" in node:
        g = {k: np.asarray(v, np.float64) for k, v in node["learngene"].items()}
        return ((g["V"] * g["sigma"]) @ g["U"].T).astype(np.float32)
    raise ConfigError(f"cannot read a dense kernel from a pre-trained layer with leaves {sorted(node)}; "
                      f"init.pretrained needs a dense checkpoint, or one whose layers have a learngene part")


def random_svd_backbone(kernel: np.ndarray, n_components: int, key: jax.Array) -> np.ndarray:
    """``W = P diag(s) Qᵀ`` cut to ``N_G`` singular components drawn at random (a learngene of random
    components, the ablation of a learnt one),
    ``W_I = P[:, I] diag(s_I) Q[:, I]ᵀ`` with ``I`` a uniform ``N_G``-subset of ``0..r-1``."""
    p, s, qt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    if not 0 < n_components <= s.size:
        raise ConfigError(f"init.svd_components={n_components} must be in [1, {s.size}] for a "
                          f"{kernel.shape} kernel")
    keep = np.sort(np.asarray(jax.random.choice(key, s.size, (n_components,), replace=False)))
    return ((p[:, keep] * s[keep]) @ qt[keep]).astype(np.float32)


def _block(key: tuple[str, ...]) -> int | None:
    return int(key[0][len("block_"):]) if key[0].startswith("block_") else None


def init_from_pretrained(fresh: Mapping[str, Any], pretrained: Mapping[str, Any], key: jax.Array,
                         config: ml_collections.ConfigDict) -> dict:
    """``fresh`` parameters of the new model initialised from ``pretrained`` (see the module doc).

    Refuses a source of another depth (blocks would stay random or be dropped).  Copies leaves of
    the same path and shape (a shape clash is a ConfigError naming the leaf), the label table's null row, and linear kernels (:func:`dense_kernel`, or
    :func:`random_svd_backbone` with ``init.svd_components > 0``); keeps the fresh value
    for leaves the source lacks (adapters, the new classes' label rows) and, when
    ``init.blocks`` is not empty, for every block not listed.
    """
    init = config.init
    blocks = set(init.blocks) if init.blocks else None
    nested = param_rules.as_dict(pretrained)
    source = traverse_util.flatten_dict(nested)
    fresh_flat = traverse_util.flatten_dict(param_rules.as_dict(fresh))
    depths = [len({_block(k) for k in tree if _block(k) is not None}) for tree in (source, fresh_flat)]
    if depths[0] != depths[1]:
        raise ConfigError(f"init.pretrained={init.pretrained!r} is a DiT of {depths[0]} blocks, this model has "
                          f"{depths[1]}: blocks would be left random or dropped. Set model.depth={depths[0]}, or start "
                          f"a DiT of another depth with a growth rule (init.grow)")
    layers = {k[:j + 1] for k in source for j, name in enumerate(k) if name in ROLES}
    out = {}
    for i, (path, leaf) in enumerate(fresh_flat.items()):
        block = _block(path)
        if blocks is not None and block is not None and block not in blocks:
            out[path] = leaf
            continue
        if path[:-1] in layers and path[-1] == "kernel":
            node = nested
            for name in path[:-1]:
                node = node[name]
            value = dense_kernel(node)
            if init.svd_components > 0:
                value = random_svd_backbone(value, init.svd_components, jax.random.fold_in(key, i))
        elif param_rules.is_label_table(tuple(jax.tree_util.DictKey(k) for k in path)) and path in source:
            value = jnp.asarray(leaf).at[-1].set(source[path][-1])
        elif path in source:
            value = source[path]
        else:
            out[path] = leaf
            continue
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConfigError(f"init.pretrained: parameter {'/'.join(path)} has shape {tuple(value.shape)} in "
                              f"the pre-trained model but {tuple(leaf.shape)} in this one; the two DiTs "
                              f"must have the same hidden size, depth, patch size and channels")
        out[path] = jnp.asarray(value, leaf.dtype)
    params = traverse_util.unflatten_dict(out)
    adapt = VARIANTS[config.model.linear.kind].from_dense
    if adapt is None:
        return params
    return param_rules.map_layers(params, lambda name, node: name in ROLES and "kernel" in node,
                      lambda node, layer_key: adapt(node, layer_key, config.model.linear),
                      jax.random.fold_in(key, 1 << 20))


def pretrained_init(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters of a run with ``init.pretrained``: the checkpoint read, the blocks
    chosen (``init.blocks``, or ``init.select`` measured by :mod:`kindjax.transfer.layer_selection`),
    and :func:`init_from_pretrained` applied."""

    pretrained, source_config = load_params(config.init.pretrained)
    if config.init.select:
        every = config.copy_and_resolve_references()
        every.init.blocks = ()
        transferred = init_from_pretrained(fresh, pretrained, key, every)
        config = config.copy_and_resolve_references()
        config.init.blocks = select_blocks(config, pretrained, source_config, transferred, jax.random.fold_in(key, 7))
    return init_from_pretrained(fresh, pretrained, key, config)


def load_teacher(config: ml_collections.ConfigDict) -> tuple[DiT, dict]:
    """``(model, EMA params)`` of ``train.distill.teacher``; refuses a teacher whose inputs or classes differ."""
    path = config.train.distill.teacher
    params, teacher_config = load_params(path)
    for key in ("image_size", "in_channels", "num_classes"):
        if teacher_config.model[key] != config.model[key]:
            raise ConfigError(f"train.distill.teacher={path!r} has model.{key}={teacher_config.model[key]}, this "
                              f"model {config.model[key]}: the teacher must see the same inputs and classes")
    return build_model(teacher_config), params
