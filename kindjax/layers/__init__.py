"""Linear-layer variants: the one place where methods differ.

The DiT never builds its main matrices (q, k, v, attention out, MLP in, MLP out)
itself; it asks a *linear factory* for them.  A method (dense DiT, KIND, FINE, a
PEFT baseline) is one factory plus a config.  Every layer a factory returns is a
Linen module called as ``layer(x, y)`` with tokens ``x`` of shape ``(B, N, d_in)``
and the per-sample class ids ``y`` of shape ``(B,)`` (the null class of
classifier-free guidance is ``num_classes``); variants that are not class-gated
ignore ``y``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import flax.linen as nn
import ml_collections

from kindjax.layers.dense import DenseLinear
from kindjax.layers.kind import kind_factory

#: Roles of the six main matrices of a DiT block, in the papers' vocabulary.
ROLES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


class LinearFactory(Protocol):
    def __call__(self, role: str, features: int, name: str) -> nn.Module:
        """Returns the layer for matrix ``role`` with ``features`` outputs."""


def dense_factory(config: ml_collections.ConfigDict) -> LinearFactory:
    """Plain dense layers: W x + b (the DiT baseline)."""
    del config

    def make(role: str, features: int, name: str) -> nn.Module:
        del role
        return DenseLinear(features=features, name=name)

    return make


#: Registered variants: ``config.model.linear.kind`` → builder(config) → factory.
VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], LinearFactory]] = {
    "dense": dense_factory,
    "kind": kind_factory,
}


def make_linear_factory(model_config: ml_collections.ConfigDict) -> LinearFactory:
    """The linear factory chosen by ``model_config.linear.kind``."""
    kind = model_config.linear.kind
    if kind not in VARIANTS:
        raise ValueError(
            f"config.model.linear.kind={kind!r} is not a known linear-layer variant; "
            f"choose one of {sorted(VARIANTS)}.")
    return VARIANTS[kind](model_config)
