"""TLEG (Xia et al. 2024, "Transformer as Linear Expansion of Learngene"): layer ``l``'s weights are
``θ_l = θ_A + (l/L)·θ_B``, with ``θ_A``, ``θ_B`` shared by every block.

Each of the six main matrices of block ``l`` (``l = 1..L`` counts the DiT's ``block_0 .. block_{L-1}``,
so ``block_i`` has ``l = i + 1`` and the last block uses ``θ_A + θ_B``) computes
``out = x·(K_A + (l/L)·K_B) + (b_A + (l/L)·b_B)``.  ``θ_A``, ``θ_B`` (kernel and bias, one pair per
role) are the learngene; :func:`kindjax.papers.fine.growth.tleg_expand` turns them into a dense DiT of
any depth ``L′`` with ``θ_A + (l/L′)·θ_B``.  The adaLN modulation of each block is not a factory
layer: it stays per block (the paper's transformer has no adaLN).

Parameter tree::

    tleg_bases/<role>/theta_A/{kernel (d_in, d_out), bias (d_out,)}   shared by every block
    tleg_bases/<role>/theta_B/{kernel, bias}

Init: ``θ_A`` as the dense DiT layer (xavier-uniform kernel, zero bias), ``θ_B = 0``: every layer
starts equal and the depth direction ``θ_B`` is learned.  The coefficient ``l/L`` is fixed; the
block index is read from the layer's module path (``block_<i>/…``), so ``model.scan_blocks``
(which runs one block without its name) is refused.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kindjax.archs import resolve_dims
from kindjax.layers.base import SharedParams, check_linear_keys
from kindjax.layers.svd import matrix_shapes

#: Name of the top-level module holding ``θ_A``, ``θ_B``.
BASES = "tleg_bases"
THETA_A, THETA_B = "theta_A", "theta_B"
CONFIG_KEYS = ("kind",)
_BLOCK = re.compile(r"^block_(\d+)$")


def block_index(module: nn.Module) -> int:
    """The 0-based index ``i`` of the DiT block (``block_<i>``) a layer module sits in."""
    for name in module.path:
        found = _BLOCK.match(str(name))
        if found:
            return int(found.group(1))
    raise ValueError(f"layer {'/'.join(map(str, module.path))} is not inside a DiT block_<i>: this variant "
                     f"needs the block index, so it cannot run with model.scan_blocks=True")


def tleg_coefficient(index: int, depth: int) -> float:
    """``l/L`` for ``block_<index>`` of an ``L = depth`` model, ``l = index + 1``."""
    return (index + 1) / depth


def init_theta(key: jax.Array, d_in: int, d_out: int) -> dict[str, dict[str, jax.Array]]:
    """``θ_A``: xavier-uniform kernel, zero bias; ``θ_B``: zeros."""
    kernel = nn.initializers.xavier_uniform()(key, (d_in, d_out), jnp.float32)
    zeros = {"kernel": jnp.zeros((d_in, d_out), jnp.float32), "bias": jnp.zeros((d_out,), jnp.float32)}
    return {THETA_A: {"kernel": kernel, "bias": jnp.zeros((d_out,), jnp.float32)}, THETA_B: zeros}


def tleg_weights(theta: Mapping[str, Mapping[str, jax.Array]], coefficient: float | jax.Array) -> dict:
    """``{kernel, bias}`` of ``θ_A + coefficient·θ_B``."""
    return {name: theta[THETA_A][name] + coefficient * theta[THETA_B][name] for name in ("kernel", "bias")}


class TlegBases(nn.Module):
    """``θ_A``, ``θ_B`` of all six roles; ``__call__()`` returns ``{role: {theta_A, theta_B}}``."""

    shapes: tuple[tuple[str, int, int], ...]   # (role, d_in, d_out)

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        return {role: self.param(role, init_theta, d_in, d_out) for role, d_in, d_out in self.shapes}


class TlegLinear(nn.Module):
    """``out = x·(K_A + (l/L)·K_B) + b_A + (l/L)·b_B`` with ``θ_A``, ``θ_B`` lent by :class:`TlegBases`."""

    features: int
    theta: Mapping[str, Any]
    depth: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        w = tleg_weights(self.theta, tleg_coefficient(block_index(self), self.depth))
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), w["kernel"].astype(dtype)) + w["bias"].astype(dtype)


@dataclasses.dataclass(frozen=True)
class TlegFactory:
    """The TLEG linear factory: one :class:`TlegLinear` per matrix, ``θ`` from ``shared``."""

    depth: int
    shapes: tuple[tuple[str, int, int], ...]

    @property
    def shared_params(self) -> SharedParams:
        return SharedParams(name=BASES, module=lambda name: TlegBases(self.shapes, name=name))

    def __call__(self, role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        if shared is None or role not in shared:
            raise ValueError(f"the TLEG factory needs θ_A, θ_B of role {role!r} (shared=): only the DiT, "
                             f"which builds {BASES!r}, can make TLEG layers")
        return TlegLinear(features=features, theta=shared[role], depth=self.depth, name=name)


def tleg_factory(model_config: ml_collections.ConfigDict) -> TlegFactory:
    """TLEG layers for all six matrices of an ``L``-block DiT."""
    check_linear_keys(model_config.linear, CONFIG_KEYS, "tleg")
    shapes = tuple((role, d_in, d_out) for role, (d_in, d_out) in matrix_shapes(model_config).items())
    return TlegFactory(depth=resolve_dims(model_config).depth, shapes=shapes)
