"""The optimizer: AdamW on the trainable leaves, nothing on the frozen ones.

Which leaves train is the config's :func:`kindjax.params.update_rule`.  Frozen leaves go
through ``optax.set_to_zero`` inside ``optax.partition`` — not ``optax.masked``, which
would pass their raw gradients through — so they carry no Adam state and stay
bit-identical.  Gradient clipping sits inside the trainable branch so frozen gradients
do not count toward the norm.
"""
from __future__ import annotations

import ml_collections
import optax

from kindjax import params as param_rules


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant ``lr`` after a linear warm-up of ``warmup_steps`` (0: none)."""
    o = config.optim
    if o.warmup_steps > 0:
        return optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return optax.constant_schedule(o.lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (with global-norm clipping) on the rule's trainable leaves, zero updates elsewhere."""
    o = config.optim
    trainable = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.partition({"trainable": trainable, "frozen": optax.set_to_zero()},
                           param_rules.update_rule(config).labels)
