"""``init.learngene``: KIND → KIND transfer to new classes (the large-domain-shift setting).

The learngene (every class-agnostic leaf, and the null row of the label table) is copied
from the pre-trained model; each KIND layer gets fresh tailors, orthonormal to the copied
learngene factors (:func:`kindjax.papers.kind.layer.init_tailors`), and the new classes fresh
label rows.  With ``train.freeze_learngene`` the copied part stays bit-identical while the
tailors train.  :func:`transfer_config` is the one place that turns a config into a KIND
transfer run; the two-stage job, the comparison command and the task configs all use it.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections

from kindjax import params as param_rules
from kindjax.config import ConfigError, differences
from kindjax.papers.kind.layer import init_tailors, kind_config
from kindjax.checkpoints.learngene import load_learngene

#: Model-config keys that must agree between the learngene and the new model.
SHAPE_KEYS = ("arch", "hidden_size", "depth", "num_heads", "image_size", "in_channels", "patch_size",
              "mlp_ratio", "learn_sigma")


def check_compatible(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> None:
    """Refuses a learngene whose shapes do not fit the new model (classes may differ)."""
    linear_keys = ("kind", "n_learngene", "n_tailor") if source.linear.kind == target.linear.kind == "kind" else ("kind",)

    def shape(model: ml_collections.ConfigDict) -> dict:
        return {**{k: model[k] for k in SHAPE_KEYS}, "linear": {k: model.linear[k] for k in linear_keys}}

    diffs = differences(shape(source), shape(target), ("learngene ", "config "), "model.")
    if diffs:
        raise ConfigError("the learngene does not fit this model: " + "; ".join(diffs))


def init_from_learngene(fresh: Mapping[str, Any], learngene: Mapping[str, Any], key: jax.Array,
                       model_config: ml_collections.ConfigDict) -> dict:
    """``fresh`` parameters of the new model with ``learngene`` copied in and every KIND
    layer's tailors re-drawn orthonormal to the copied learngene factors (σ as initialised)."""
    _, tailors = param_rules.split_learngene_tailors(fresh)

    def redraw(node: dict, layer_key: jax.Array) -> dict:
        n_classes, n_tailor = node["tailors"]["sigma"].shape
        factors = init_tailors(layer_key, node["learngene"], n_classes, n_tailor, 1.0)
        return {**node, "tailors": {**factors, "sigma": node["tailors"]["sigma"]}}

    return param_rules.map_layers(param_rules.merge_learngene_tailors(learngene, tailors),
                                  lambda name, node: "learngene" in node and "tailors" in node, redraw, key)


def novel_task(config: ml_collections.ConfigDict, seed: int | None = None) -> ml_collections.ConfigDict:
    """The downstream task of a config with ``transfer.classes``: a one-stage run on those classes
    (relabelled ``0..k-1``) for ``transfer.num_steps`` steps; ``seed`` replaces the train and data seeds."""
    c = config.copy_and_resolve_references()
    t = config.transfer
    c.job = "train"
    c.data.classes = tuple(t.classes)
    c.model.num_classes = len(t.classes)
    c.train.num_steps = t.num_steps
    if seed is not None:
        c.train.seed = c.data.seed = seed
    c.transfer = ml_collections.ConfigDict(dict(classes=(), num_steps=t.num_steps, lr=t.lr, recombine_classes=()))
    return c


def as_kind_transfer(config: ml_collections.ConfigDict, learngene: str, n_learngene: int, n_tailor: int,
                     formulation: str = "gated") -> ml_collections.ConfigDict:
    """``config`` (a task on its classes) as KIND transfer: the learngene at ``learngene`` frozen,
    KIND layers with ``N_G``, ``N_T`` and fresh tailors for ``model.num_classes`` classes."""
    c = config.copy_and_resolve_references()
    c.init.learngene = learngene
    c.train.freeze_learngene = True
    c.model.linear = kind_config(n_learngene, n_tailor, formulation)
    return c


def transfer_config(config: ml_collections.ConfigDict, learngene: str,
                    seed: int | None = None) -> ml_collections.ConfigDict:
    """The transfer stage of a ``kind_transfer`` job: the novel classes, fresh tailors,
    the learngene frozen, ``transfer.lr`` for ``transfer.num_steps`` steps."""
    linear = config.model.linear
    c = as_kind_transfer(novel_task(config, seed), learngene, linear.n_learngene, linear.n_tailor,
                         linear.get("formulation", "gated"))
    c.optim.lr = config.transfer.lr
    return c


def learngene_init(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters of a run with ``init.learngene``: the learngene read (no tailor leaf
    is read), checked against this model, and :func:`init_from_learngene` applied."""
    learngene = load_learngene(config.init.learngene)
    check_compatible(learngene.config.model, config.model)
    return init_from_learngene(fresh, learngene.params, key, config.model)
