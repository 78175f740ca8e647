"""Linear-layer variants: the one place where methods differ.

The DiT never builds its main matrices (q, k, v, attention out, MLP in, MLP out)
itself; it asks a *linear factory* for them.  A method (the dense DiT, a PEFT baseline, a
paper's decomposed layer) is one registered :class:`Variant` plus a config: the core registers
its own here, a paper package registers its variants on import (:mod:`kindjax.registry`).  Every layer a factory returns is a
Linen module called as ``layer(x, y)`` with tokens ``x`` of shape ``(B, N, d_in)``
and the per-sample class ids ``y`` of shape ``(B,)`` (the null class of
classifier-free guidance is ``num_classes``); variants that are not class-gated
ignore ``y``.

A variant may also hold parameters once per model, shared by the layers of every
block (shared bases ``U``, ``V``): its factory then carries a ``shared_params``
attribute (:class:`SharedParams`).  The DiT builds that module once at the top
level, calls it, and passes its output to every ``make(role, features, name,
shared=...)``; factories without shared parameters get ``shared=None`` and ignore it.

A variant may also declare ``fused_roles`` (:data:`kindjax.layers.base.FUSABLE_ROLES`): the DiT
then asks it for one ``"qkv"`` matrix (``d → 3d``, split into q, k, v after the product) instead
of three, and/or for the ``"adaln"`` modulation matrix (``d → 6d``, applied to ``SiLU(c)``)
instead of building that one as a plain dense layer.  Other variants' trees do not change.  A
variant whose layers run a Pallas kernel declares ``counted_twin``: the same layers in XLA operations,
for FLOP counts (:func:`kindjax.models.dit.unrolled`).  A layer class that sets ``applies_residual``
sums a block's residual branch ``r + g ⊙ layer(x, y)`` itself (:func:`kindjax.models.dit.gated_residual`).
A variant may declare ``fused_mlp`` (:func:`kindjax.layers.base.fused_mlp`): the DiT block then hands it its
two MLP layers and computes its MLP half (LayerNorm, modulation, both products, GELU, gated residual) with it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from kindjax.layers import adapters
from kindjax.layers.base import (FUSABLE_ROLES, LinearFactory, SharedParams, applies_residual, counted_twin,
                                 fused_mlp, fused_roles, gated_sum, shared_params, xavier_fan_out)
from kindjax.layers.dense import DenseLinear
from kindjax.registry import Registry

#: Roles of the six main matrices of a DiT block, in the papers' vocabulary.
ROLES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A linear-layer variant: ``build(model_config) → factory``; optionally ``from_dense(layer_params,
    key, linear_config) → layer_params``, its data-dependent start from a pre-trained dense layer
    (:mod:`kindjax.transfer.pretrained`; without it a variant keeps the copied dense leaves and its own
    fresh init), and ``class_gated(linear_config) → bool``: a sample of class ``c`` reaches only row
    ``c`` of its class-row leaves (the class gate of :mod:`kindjax.params`); ``tailored``: its layers
    split into a learngene and per-class tailors (leaves under ``tailors``), which can be read apart."""

    build: Callable[[ml_collections.ConfigDict], LinearFactory]
    from_dense: Callable[[dict, Any, ml_collections.ConfigDict], dict] | None = None
    class_gated: Callable[[ml_collections.ConfigDict], bool] | None = None
    tailored: bool = False


#: ``config.model.linear.kind`` → :class:`Variant`.
VARIANTS: Registry[Variant] = Registry("linear-layer variant", key="config.model.linear.kind")


def register_variant(name: str, build: Callable[[ml_collections.ConfigDict], LinearFactory], *,
                     from_dense: Callable | None = None, class_gated: Callable | None = None,
                     tailored: bool = False) -> Variant:
    """Adds variant ``name`` (see :class:`Variant`)."""
    return VARIANTS.register(name, Variant(build, from_dense, class_gated, tailored))


def dense_factory(config: ml_collections.ConfigDict) -> LinearFactory:
    """Plain dense layers: W x + b (the DiT baseline), xavier-uniform with ``model.qkv_init``'s fans."""
    qkv_init = config.get("qkv_init", "fused")
    xavier_fan_out(ROLES[0], 1, qkv_init)   # checks the setting before anything is traced

    def make(role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        del shared
        return DenseLinear(features=features, fan_out=xavier_fan_out(role, features, qkv_init), name=name)

    return make


register_variant("dense", dense_factory)
for _name, _build in adapters.FACTORIES.items():
    register_variant(_name, _build, from_dense=adapters.FROM_DENSE.get(_name))


def is_class_gated(model_config: ml_collections.ConfigDict) -> bool:
    """True when ``model_config.linear`` routes each sample to its own class's rows only."""
    gated = VARIANTS[model_config.linear.kind].class_gated
    return bool(gated and gated(model_config.linear))


def make_linear_factory(model_config: ml_collections.ConfigDict) -> LinearFactory:
    """The linear factory chosen by ``model_config.linear.kind``."""
    return VARIANTS[model_config.linear.kind].build(model_config)


__all__ = ["FUSABLE_ROLES", "ROLES", "VARIANTS", "LinearFactory", "SharedParams", "Variant", "applies_residual",
           "counted_twin", "dense_factory", "fused_mlp", "fused_roles", "gated_sum", "is_class_gated",
           "make_linear_factory", "register_variant", "shared_params"]
