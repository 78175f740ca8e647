"""The dense linear layer of the plain DiT."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def xavier_uniform(d_in: int, d_out: int, fan_out: int | None = None) -> nn.initializers.Initializer:
    """``U(−a, a)`` with ``a = sqrt(6/(d_in + fan_out))``: entry variance ``2/(d_in + fan_out)``
    (``fan_out`` defaults to ``d_out``: Flax's ``xavier_uniform``, draw for draw)."""
    fan_out = d_out if fan_out is None else fan_out
    return nn.initializers.variance_scaling((d_in + d_out) / (d_in + fan_out), "fan_avg", "uniform")


class DenseLinear(nn.Module):
    """``out = x · W + b`` with W of shape ``(d_in, features)``, xavier-uniform as DiT's: ``fan_out``
    (default ``features``) is ``3·features`` for a third of DiT's fused ``d → 3d`` qkv matrix
    (:func:`kindjax.layers.base.xavier_fan_out`)."""

    features: int
    dtype: jnp.dtype | None = None
    fan_out: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        d_in = x.shape[-1]
        kernel = self.param("kernel", xavier_uniform(d_in, self.features, self.fan_out), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
