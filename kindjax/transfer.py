"""Transfer: a new model for new classes that starts from a pre-trained one.

Two routes.  ``init.learngene`` (KIND → KIND):

KIND's large-domain-shift setting: the learngene (every class-agnostic leaf, and the
null row of the label table) is copied from the pre-trained model; each KIND
layer gets fresh tailors, orthonormal to the copied learngene factors
(``kindjax.layers.kind.init_tailors``), and the new classes fresh label rows.
With ``train.freeze_learngene`` the copied part stays bit-identical while the
tailors train.

``init.pretrained`` (any pre-trained DiT → any variant; the baselines): every leaf
whose path and shape the new model shares is copied; a linear layer's kernel comes
from the source's dense kernel or KIND learngene (``W = V_G diag(σ_G) U_Gᵀ``),
optionally cut to ``init.svd_components`` random singular components (KIND's
ablation #1); ``init.blocks`` limits the copy to some DiT blocks (the layer-transfer
learngenes Heur-LG and Auto-LG, :mod:`kindjax.layer_selection`); the new classes get
fresh label rows; finally the variant's data-dependent initialisation
(``kindjax.layers.FROM_DENSE``: PiSSA's and SVDiff's SVD, DoRA's magnitude) runs on
every linear layer.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from kindjax import params as P
from kindjax.config import ConfigError
from kindjax.layers import FROM_DENSE, ROLES
from kindjax.layers.kind import init_tailors

#: Model-config keys that must agree between the learngene and the new model.
SHAPE_KEYS = ("arch", "hidden_size", "depth", "num_heads", "image_size", "in_channels", "patch_size",
              "mlp_ratio", "learn_sigma")


def check_compatible(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> None:
    """Refuses a learngene whose shapes do not fit the new model (classes may differ)."""
    diffs = [f"model.{k}: learngene {source[k]!r} vs config {target[k]!r}"
             for k in SHAPE_KEYS if source[k] != target[k]]
    if source.linear.kind != target.linear.kind:
        diffs.append(f"model.linear.kind: learngene {source.linear.kind!r} vs config {target.linear.kind!r}")
    elif target.linear.kind == "kind":
        for k in ("n_learngene", "n_tailor"):
            if source.linear[k] != target.linear[k]:
                diffs.append(f"model.linear.{k}: learngene {source.linear[k]} vs config {target.linear[k]}")
    if diffs:
        raise ConfigError("the learngene does not fit this model: " + "; ".join(diffs))


def transfer_learngene(fresh: Mapping[str, Any], learngene: Mapping[str, Any], key: jax.Array,
                       model_config: ml_collections.ConfigDict) -> dict:
    """``fresh`` parameters of the new model with ``learngene`` copied in and every KIND
    layer's tailors re-drawn orthonormal to the copied learngene factors (σ as initialised)."""
    _, tailors = P.split_learngene_tailors(fresh)

    def redraw(node: dict, layer_key: jax.Array) -> dict:
        n_classes, n_tailor = node["tailors"]["sigma"].shape
        factors = init_tailors(layer_key, node["learngene"], n_classes, n_tailor, 1.0)
        return {**node, "tailors": {**factors, "sigma": node["tailors"]["sigma"]}}

    return map_layers(P.merge_learngene_tailors(learngene, tailors),
                      lambda name, node: "learngene" in node and "tailors" in node, redraw, key)


def map_layers(tree: Mapping[str, Any], is_layer: Callable[[str, Mapping], bool],
               fn: Callable[[dict, jax.Array], dict], key: jax.Array) -> dict:
    """``tree`` with ``fn(node, key_j)`` applied to every sub-tree ``node`` (under key ``name``)
    for which ``is_layer(name, node)``; ``key_j = fold_in(key, j)`` for the j-th such layer."""
    counter = iter(range(1 << 30))

    def visit(node: Any, name: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        if is_layer(name, node):
            return fn(dict(node), jax.random.fold_in(key, next(counter)))
        return {k: visit(v, k) for k, v in node.items()}

    return visit(tree, "")


def transfer_config(config: ml_collections.ConfigDict, learngene: str) -> ml_collections.ConfigDict:
    """The transfer stage of a ``kind_transfer`` job: the novel classes, fresh tailors,
    the learngene frozen, ``transfer.lr`` for ``transfer.num_steps`` steps."""
    c = config.copy_and_resolve_references()
    t, k = config.transfer, len(config.transfer.classes)
    c.job = "train"
    c.data.classes = tuple(t.classes)
    c.model.num_classes = k
    c.model.linear.n_classes = k
    c.init.learngene = learngene
    c.train.freeze_learngene = True
    c.optim.lr = t.lr
    c.train.num_steps = t.num_steps
    c.transfer = ml_collections.ConfigDict(dict(classes=(), num_steps=t.num_steps, lr=t.lr, recombine_classes=()))
    return c


def dense_kernel(node: Mapping[str, Any]) -> np.ndarray:
    """The ``(d_in, d_out)`` kernel a pre-trained linear layer computes with: its ``kernel``,
    or a KIND layer's learngene product ``V_G diag(σ_G) U_Gᵀ`` (tailors left out)."""
    if "kernel" in node:
        return np.asarray(node["kernel"], np.float32)
    if "learngene" in node:
        g = {k: np.asarray(v, np.float64) for k, v in node["learngene"].items()}
        return ((g["V"] * g["sigma"]) @ g["U"].T).astype(np.float32)
    raise ConfigError(f"cannot read a dense kernel from a pre-trained layer with leaves {sorted(node)}; "
                      f"init.pretrained needs a dense or KIND checkpoint")


def random_svd_backbone(kernel: np.ndarray, n_components: int, key: jax.Array) -> np.ndarray:
    """KIND ablation #1: ``W = P diag(s) Qᵀ`` keeps ``N_G`` singular components drawn at random,
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

    Copies leaves of the same path and shape (a shape clash is a ConfigError naming the
    leaf), the label table's null row, and linear kernels (:func:`dense_kernel`, or
    :func:`random_svd_backbone` with ``init.svd_components > 0``); keeps the fresh value
    for leaves the source lacks (adapters, the new classes' label rows) and, when
    ``init.blocks`` is not empty, for every block not listed.
    """
    init = config.init
    blocks = set(init.blocks) if init.blocks else None
    nested = P._as_dict(pretrained)
    source = traverse_util.flatten_dict(nested)
    layers = {k[:j + 1] for k in source for j, name in enumerate(k) if name in ROLES}
    out = {}
    for i, (path, leaf) in enumerate(traverse_util.flatten_dict(P._as_dict(fresh)).items()):
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
        elif P.is_label_table(tuple(jax.tree_util.DictKey(k) for k in path)) and path in source:
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
    adapt = FROM_DENSE.get(config.model.linear.kind)
    if adapt is None:
        return params
    return map_layers(params, lambda name, node: name in ROLES and "kernel" in node,
                      lambda node, layer_key: adapt(node, layer_key, config.model.linear),
                      jax.random.fold_in(key, 1 << 20))


def pretrained_init(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters of a run with ``init.pretrained``: the checkpoint read, the blocks
    chosen (``init.blocks``, or ``init.select`` measured by :mod:`kindjax.layer_selection`), and
    :func:`init_from_pretrained` applied."""
    from kindjax.layer_selection import select_blocks
    from kindjax.learngene import load_params

    pretrained, source_config = load_params(config.init.pretrained)
    if config.init.select:
        every = config.copy_and_resolve_references()
        every.init.blocks = ()
        transferred = init_from_pretrained(fresh, pretrained, key, every)
        config = config.copy_and_resolve_references()
        config.init.blocks = select_blocks(config, pretrained, source_config, transferred, jax.random.fold_in(key, 7))
    return init_from_pretrained(fresh, pretrained, key, config)


def initial_params(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters for the start ``config.init`` names, given the model's ``fresh`` ones:
    ``learngene`` (KIND learngene, fresh tailors), ``pretrained`` (:func:`pretrained_init`) or
    ``fine_learngene`` (a FINE learngene, :mod:`kindjax.fine`)."""
    init = config.init
    if init.pretrained:
        return pretrained_init(config, fresh, key)
    if init.fine_learngene:
        from kindjax.fine import init_from_config

        return init_from_config(config, fresh, key)
    from kindjax.learngene import load_learngene

    learngene = load_learngene(init.learngene)
    check_compatible(learngene.config.model, config.model)
    return transfer_learngene(fresh, learngene.params, key, config.model)
