"""Learngene transfer: a new model for new classes that starts from a pre-trained learngene.

KIND's large-domain-shift setting: the learngene (every class-agnostic leaf, and the
null row of the label table) is copied from the pre-trained model; each KIND
layer gets fresh tailors, orthonormal to the copied learngene factors
(``kindjax.layers.kind.init_tailors``), and the new classes fresh label rows.
With ``train.freeze_learngene`` the copied part stays bit-identical while the
tailors train.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections

from kindjax import params as P
from kindjax.config import ConfigError
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
    counter = iter(range(1 << 30))

    def redraw(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        if "learngene" in node and "tailors" in node:  # a KIND layer
            n_classes, n_tailor = node["tailors"]["sigma"].shape
            factors = init_tailors(jax.random.fold_in(key, next(counter)), node["learngene"],
                                   n_classes, n_tailor, 1.0)
            return {**node, "tailors": {**factors, "sigma": node["tailors"]["sigma"]}}
        return {k: redraw(v) for k, v in node.items()}

    return redraw(P.merge_learngene_tailors(learngene, tailors))


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
