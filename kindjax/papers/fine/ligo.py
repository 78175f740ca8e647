"""LiGO's depth operator (Wang et al. 2023, "Learning to Grow Pretrained Models for Efficient
Transformer Training"), depth only: layer ``l`` of an ``L′``-block DiT computes with
``W′_l = Σ_j c_{l,j}·W_j`` (and ``b′_l = Σ_j c_{l,j}·b_j``) over the ``L`` layers ``W_j`` of a
pre-trained DiT of the same width.

The source layers are stacked once per role and shared by every block; each target layer owns its
coefficients ``c_l`` (``coef``, one vector per role and block, as LiGO's per-module depth
operator).  The stacks are filled from the source and frozen while ``c`` learns on the task loss
(:func:`kindjax.papers.fine.growth.ligo_operator_config`), then ``W′`` is materialised into a dense DiT
(:func:`kindjax.papers.fine.growth.ligo_materialize`).  Width growth (LiGO's other half) is not built.

Parameter tree::

    ligo_source/<role>/kernel  (L, d_in, d_out)   the source's layers, shared by every block
    ligo_source/<role>/bias    (L, d_out)
    block_<i>/.../<role>/coef  (L,)               c_{l,·} of target layer l = i + 1

Init: ``c_l`` is one-hot on source layer :func:`stretch_blocks` ``(L, L′)[i]`` (so at step 0 the
model equals the Share-init model); the stacks start xavier-uniform and are overwritten by the
initialiser (``init.grow='ligo'``, required by :func:`kindjax.config.validate`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kindjax.archs import resolve_dims
from kindjax.layers.base import SharedParams, check_linear_keys, positive_int
from kindjax.layers.svd import matrix_shapes
from kindjax.papers.fine.tleg import block_index

#: Name of the top-level module holding the source layers' stacks.
SOURCE = "ligo_source"
COEF = "coef"
CONFIG_KEYS = ("kind", "source_depth")


def stretch_blocks(source_depth: int, depth: int) -> tuple[int, ...]:
    """Share-init's mapping: target block ``i`` (0-based) ← source block ``⌊i·L/L′⌋``; a deeper target
    repeats each source block in place (stretched), a shallower one skips some."""
    return tuple(i * source_depth // depth for i in range(depth))


def combine(coef: jax.Array, stack: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``{kernel: Σ_j c_j K_j, bias: Σ_j c_j b_j}`` of the stacked source layers."""
    return {"kernel": jnp.einsum("j,jio->io", coef, stack["kernel"]),
            "bias": jnp.einsum("j,jo->o", coef, stack["bias"])}


def init_stack(key: jax.Array, source_depth: int, d_in: int, d_out: int) -> dict[str, jax.Array]:
    """``L`` xavier-uniform kernels and zero biases (placeholders for the source's layers)."""
    kernel = nn.initializers.xavier_uniform(batch_axis=(0,))(key, (source_depth, d_in, d_out), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((source_depth, d_out), jnp.float32)}


class LigoSource(nn.Module):
    """The stacked source layers of all six roles; ``__call__()`` returns ``{role: {kernel, bias}}``."""

    shapes: tuple[tuple[str, int, int], ...]   # (role, d_in, d_out)
    source_depth: int

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        return {role: self.param(role, init_stack, self.source_depth, d_in, d_out)
                for role, d_in, d_out in self.shapes}


class LigoLinear(nn.Module):
    """``out = x·Σ_j c_j K_j + Σ_j c_j b_j`` with the source stacks lent by :class:`LigoSource`."""

    features: int
    stack: Mapping[str, jax.Array]
    depth: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        source_depth = self.stack["kernel"].shape[0]
        start = stretch_blocks(source_depth, self.depth)[block_index(self)]
        coef = self.param(COEF, lambda key: jax.nn.one_hot(start, source_depth, dtype=jnp.float32))
        w = combine(coef, self.stack)
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), w["kernel"].astype(dtype)) + w["bias"].astype(dtype)


@dataclasses.dataclass(frozen=True)
class LigoFactory:
    """The LiGO linear factory: one :class:`LigoLinear` per matrix, the stacks from ``shared``."""

    depth: int
    source_depth: int
    shapes: tuple[tuple[str, int, int], ...]

    @property
    def shared_params(self) -> SharedParams:
        return SharedParams(name=SOURCE, module=lambda name: LigoSource(self.shapes, self.source_depth, name=name))

    def __call__(self, role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        if shared is None or role not in shared:
            raise ValueError(f"the LiGO factory needs the source stack of role {role!r} (shared=): only the "
                             f"DiT, which builds {SOURCE!r}, can make LiGO layers")
        return LigoLinear(features=features, stack=shared[role], depth=self.depth, name=name)


def ligo_config(source_depth: int) -> ml_collections.ConfigDict:
    """``config.model.linear`` for LiGO growth from a ``source_depth``-block DiT."""
    return ml_collections.ConfigDict(dict(kind="ligo", source_depth=source_depth))


def ligo_factory(model_config: ml_collections.ConfigDict) -> LigoFactory:
    """LiGO layers for all six matrices; ``model.linear.source_depth`` is the source's ``L``."""
    check_linear_keys(model_config.linear, CONFIG_KEYS, "ligo")
    source_depth = positive_int(model_config.linear, "source_depth", "ligo", "the pre-trained DiT's depth")
    shapes = tuple((role, d_in, d_out) for role, (d_in, d_out) in matrix_shapes(model_config).items())
    return LigoFactory(depth=resolve_dims(model_config).depth, source_depth=source_depth, shapes=shapes)
