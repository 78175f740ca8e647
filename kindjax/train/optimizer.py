"""The optimizer: AdamW on the trainable leaves, nothing on the frozen ones.

Trainable leaves are chosen by path rules (``config.train.trainable``, regular
expressions on ``block_0/attn/q/kernel``-style paths; see :mod:`kindjax.params`).
Frozen leaves go through ``optax.set_to_zero`` inside ``optax.partition`` — not
``optax.masked``, which would pass their raw gradients through — so they carry no
Adam state and stay bit-identical.  Gradient clipping sits inside the trainable
branch so frozen gradients do not count toward the norm.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import optax

from kindjax import params as P


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant ``lr`` after a linear warm-up of ``warmup_steps`` (0: none)."""
    o = config.optim
    if o.warmup_steps > 0:
        return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return optax.constant_schedule(o.lr)


def trainable_predicate(config: ml_collections.ConfigDict) -> Callable[[tuple], bool]:
    """Path matches ``train.trainable`` and is not a learngene leaf under ``freeze_learngene``
    (the label table's null row is frozen by the class gate instead)."""
    matches = P.match_any(config.train.trainable)
    if config.train.freeze_learngene:
        return lambda path: matches(path) and not P.is_learngene(path)
    return matches


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    trainable = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    is_trainable = trainable_predicate(config)

    def labels(params: Any) -> Any:
        return P.map_with_path(lambda path, _: "trainable" if is_trainable(path) else "frozen", params)

    return optax.partition({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
