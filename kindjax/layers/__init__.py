"""Linear-layer variants: the one place where methods differ.

The DiT never builds its main matrices (q, k, v, attention out, MLP in, MLP out)
itself; it asks a *linear factory* for them.  A method (dense DiT, KIND, FINE, a
PEFT baseline) is one factory plus a config.  Every layer a factory returns is a
Linen module called as ``layer(x, y)`` with tokens ``x`` of shape ``(B, N, d_in)``
and the per-sample class ids ``y`` of shape ``(B,)`` (the null class of
classifier-free guidance is ``num_classes``); variants that are not class-gated
ignore ``y``.

A variant may also hold parameters once per model, shared by the layers of every
block (FINE's ``U``, ``V``): its factory then carries a ``shared_params``
attribute (:class:`SharedParams`).  The DiT builds that module once at the top
level, calls it, and passes its output to every ``make(role, features, name,
shared=...)``; factories without shared parameters get ``shared=None`` and ignore it.

A variant may also declare ``fused_roles`` (:data:`kindjax.layers.base.FUSABLE_ROLES`): the DiT
then asks it for one ``"qkv"`` matrix (``d → 3d``, split into q, k, v after the product) instead
of three, and/or for the ``"adaln"`` modulation matrix (``d → 6d``, applied to ``SiLU(c)``)
instead of building that one as a plain dense layer.  Other variants' trees do not change.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import ml_collections

from kindjax.layers.adapters import FROM_DENSE as ADAPTERS_FROM_DENSE
from kindjax.layers.adapters import (dora_factory, loha_factory, lora_factory, oft_factory,
                                     pissa_factory, svdiff_factory)
from kindjax.layers.base import FUSABLE_ROLES, LinearFactory, SharedParams, fused_roles, shared_params
from kindjax.layers.dense import DenseLinear
from kindjax.layers.fine import fine_factory
from kindjax.layers.kind import is_class_gated as kind_is_class_gated
from kindjax.layers.kind import kind_factory
from kindjax.layers.ligo import ligo_factory
from kindjax.layers.tleg import tleg_factory

#: Roles of the six main matrices of a DiT block, in the papers' vocabulary.
ROLES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


def dense_factory(config: ml_collections.ConfigDict) -> LinearFactory:
    """Plain dense layers: W x + b (the DiT baseline)."""
    del config

    def make(role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        del role, shared
        return DenseLinear(features=features, name=name)

    return make


#: Registered variants: ``config.model.linear.kind`` → builder(config) → factory.
VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], LinearFactory]] = {
    "dense": dense_factory,
    "kind": kind_factory,
    "fine": fine_factory,
    "lora": lora_factory,
    "dora": dora_factory,
    "pissa": pissa_factory,
    "oft": oft_factory,
    "loha": loha_factory,
    "svdiff": svdiff_factory,
    "tleg": tleg_factory,
    "ligo": ligo_factory,
}

#: Data-dependent initialisation of a variant from a pre-trained dense layer (kindjax.transfer):
#: ``kind → from_dense(layer_params, key, linear_config) -> layer_params``; kinds not listed
#: start from the copied dense leaves and their own fresh init as they are.
FROM_DENSE: dict[str, Callable] = {**ADAPTERS_FROM_DENSE}


#: Variants whose class-row leaves a sample of class ``c`` reaches only in row ``c``:
#: ``kind → predicate(linear_config)``; unlisted variants are not class-gated.
CLASS_GATED: dict[str, Callable[[ml_collections.ConfigDict], bool]] = {"kind": kind_is_class_gated}


def is_class_gated(model_config: ml_collections.ConfigDict) -> bool:
    """True when ``model_config.linear`` routes each sample to its own class's rows only."""
    gated = CLASS_GATED.get(model_config.linear.kind)
    return bool(gated and gated(model_config.linear))


def make_linear_factory(model_config: ml_collections.ConfigDict) -> LinearFactory:
    """The linear factory chosen by ``model_config.linear.kind``."""
    kind = model_config.linear.kind
    if kind not in VARIANTS:
        raise ValueError(
            f"config.model.linear.kind={kind!r} is not a known linear-layer variant; "
            f"choose one of {sorted(VARIANTS)}.")
    return VARIANTS[kind](model_config)


__all__ = ["CLASS_GATED", "FROM_DENSE", "FUSABLE_ROLES", "ROLES", "VARIANTS", "LinearFactory", "SharedParams",
           "dense_factory", "fused_roles", "is_class_gated", "make_linear_factory", "shared_params"]
