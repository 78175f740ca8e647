"""Factorised matrices ``W = U·diag(σ)·Vᵀ``: the shapes, initialisation and product that every
SVD-parameterised linear variant shares (class-gated learngene/tailors, shared bases, SVD-based
adapters)."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from kindjax.archs import resolve_dims


def matrix_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """``role → (d_in, d_out)`` of the six main matrices of a DiT block for ``model_config``."""
    dims = resolve_dims(model_config)
    hidden, mlp = dims.hidden_size, dims.mlp_hidden
    square = (hidden, hidden)
    return {"q": square, "k": square, "v": square, "attn_out": square,
            "mlp_in": (hidden, mlp), "mlp_out": (mlp, hidden)}


def init_sigma(d_in: int, d_out: int, n_used: int, fan_out: int | None = None) -> float:
    """``s = sqrt(2·d_in·d_out / ((d_in + fan_out)·n_used))`` (``fan_out`` defaults to ``d_out``).

    With orthonormal ``U``, ``V`` and all ``n_used`` singular values equal to ``s``,
    ``‖W_c‖_F² = n_used·s² = d_in·d_out·2/(d_in + fan_out)``: the expected squared norm
    of a xavier-uniform dense matrix (entry variance ``2/(d_in + fan_out)``; ``fan_out = 3·d_out``
    for a third of a fused qkv matrix, :func:`kindjax.layers.base.xavier_fan_out`).
    """
    fan_out = d_out if fan_out is None else fan_out
    return (2.0 * d_in * d_out / ((d_in + fan_out) * n_used)) ** 0.5


def extend_orthonormal(key: jax.Array, basis: jax.Array, k: int) -> jax.Array:
    """``k`` new orthonormal columns ⟂ ``basis``: the last ``k`` columns of ``Q``, ``[basis | Z] = QR``.

    ``Z ~ N(0, 1)^{n×k}`` and the signs are fixed so that ``diag(R) ≥ 0``.  With
    ``basis = Q₀`` from the same rule, this is one joint QR of ``[Z₀ | Z]`` (block
    Gram–Schmidt), i.e. the first columns of a Haar-random orthogonal matrix.
    """
    z = jax.random.normal(key, (basis.shape[0], k), jnp.float32)
    q, r = jnp.linalg.qr(jnp.concatenate([basis.astype(jnp.float32), z], axis=1))
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
    return q[:, basis.shape[1]:]


def svd_product(x: jax.Array, factors: Mapping[str, jax.Array], dtype: jnp.dtype) -> jax.Array:
    """``x·V diag(σ) Uᵀ``, associated for the fewest multiply-adds at ``x``'s static shape.

    Either ``W = V diag(σ) Uᵀ`` is built once (from factors cast to ``dtype``, shared by
    the batch: ``d_in·r·d_out``) and applied (``n·d_in·d_out`` for ``n`` rows of ``x``),
    or ``x`` goes through the two thin factors (``n·r·(d_in + d_out)``).  The thin
    route always wins when ``r < d_in·d_out/(d_in + d_out)`` (DiT-S, ``r = 234``:
    the MLP matrices, threshold 307), otherwise only for few rows (the 384×384
    matrices of DiT-S: below 1070 rows).  Each sample still gets no weight of its own.
    """
    v, sigma, u = factors["V"], factors["sigma"], factors["U"]
    (d_in, rank), d_out = v.shape, u.shape[0]
    rows = x.size // d_in
    if rows * rank * (d_in + d_out) < d_in * d_out * (rows + rank):
        return jnp.dot(jnp.dot(x, v.astype(dtype)) * sigma.astype(dtype), u.T.astype(dtype))
    return jnp.dot(x, (v.astype(dtype) * sigma.astype(dtype)) @ u.T.astype(dtype))
