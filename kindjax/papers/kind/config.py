"""KIND's config keys (:class:`kindjax.config.Extension` ``"kind"``) and their checks.

``init.learngene`` starts a KIND model from a pre-trained learngene with fresh tailors
(:mod:`kindjax.papers.kind.transfer`); ``job="kind_transfer"`` pre-trains under the class gate, then
transfers the frozen learngene to ``transfer.classes`` (:mod:`kindjax.papers.kind.jobs`).
"""
from __future__ import annotations

import ml_collections

from kindjax.config import Extension, require

DEFAULTS = {
    # Start from a pre-trained learngene (a workdir, step dir or sliced checkpoint); tailors and the
    # new classes' label rows are drawn fresh (kindjax.papers.kind.transfer).
    "init.learngene": "",
    # job="kind_transfer": after pre-training on data.classes, transfer the learngene (frozen) to
    # `classes` with fresh tailors, and recombine `recombine_classes`.
    "transfer": dict(classes=(), num_steps=1000, lr=1e-3, recombine_classes=()),
}


def validate(config: ml_collections.ConfigDict) -> None:
    """KIND's keys, and a frozen learngene (``train.freeze_learngene``) only on a transferred one."""
    m, i = config.model, config.init
    if config.job == "kind_transfer" or config.train.freeze_learngene or i.learngene:
        require(m.linear.kind == "kind", f"job={config.job!r} / train.freeze_learngene / init.learngene need "
                                         f"a KIND model (model.linear.kind='kind'), got {m.linear.kind!r}")
    if config.train.freeze_learngene:
        require(bool(i.learngene), "train.freeze_learngene would freeze a randomly initialised learngene: set "
                                   "init.learngene to a KIND pre-training workdir (or a sliced learngene)")
    if config.job == "kind_transfer":
        require(len(config.transfer.classes) > 0, "job='kind_transfer' needs transfer.classes (the novel classes)")
        overlap = set(config.transfer.classes) & set(config.data.classes)
        require(not overlap, f"transfer.classes {sorted(overlap)} are also pre-training classes (data.classes)")
        require(set(config.transfer.recombine_classes) <= set(range(m.num_classes)),
                f"transfer.recombine_classes={tuple(config.transfer.recombine_classes)} must be model "
                f"classes 0..{m.num_classes - 1}")


EXTENSION = Extension(DEFAULTS, starts=("learngene",), validate=validate, unrecorded=("transfer",))
