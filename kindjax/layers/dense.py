"""The dense linear layer of the plain DiT."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DenseLinear(nn.Module):
    """``out = x · W + b`` with W of shape ``(d_in, features)`` (xavier-uniform, as DiT)."""

    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        kernel = self.param("kernel", nn.initializers.xavier_uniform(),
                            (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
