"""FINE: singular vectors shared by all layers, singular values per layer.

Every factorized matrix of block ``l`` is ``W_l = U · diag(σ_l) · Vᵀ`` (FINE eq. 7) with
``U`` of shape ``(d_out, r)`` and ``V`` of shape ``(d_in, r)`` shared by all blocks
(one pair per matrix type) and ``σ_l`` of shape ``(r,)`` and a bias owned by the layer.
The shared ``U, V`` are FINE's learngene, used to initialise DiTs of other depths
(:mod:`kindjax.papers.fine.transfer`).

``config.model.linear.layout`` says which matrices are factorized:

- ``"paper"`` (default): FINE's five matrix types per block, ``T = {qkv, o, in, out, adaLN}``:
  ``qkv`` one fused ``d → 3d`` matrix (split into q, k, v after the product), ``attn_out``,
  ``mlp_in``, ``mlp_out`` and ``adaln`` (the block's adaLN modulation ``d → 6d``);
- ``"per_role"`` (kindjax's earlier layout, kept as an option): q, k, v factorized separately,
  the adaLN modulation a plain dense layer per block.

``r`` is ``config.model.linear.rank``, the number of shared singular components: our reading
of the supplementary's "sigma share" (Table 7: DiT-B 100, DiT-L 148); the paper text that
defines it was not available (``papers/fine_main_notes.md`` §2.3).

Parameter tree (a path says what a leaf is)::

    fine_bases/<role>/U        (d_out, r)   one array per role, shared by every block
    fine_bases/<role>/V        (d_in, r)
    block_<l>/.../<layer>/sigma (r,)        per layer (<layer>: attn/qkv, attn/attn_out, mlp_in,
    block_<l>/.../<layer>/bias  (d_out,)    mlp_out, adaln_modulation; per_role: attn/q, attn/k, …)

The DiT builds ``fine_bases`` once (:class:`FineBases`, declared through
:class:`kindjax.layers.SharedParams`) and lends its arrays to every layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.layers.base import (FUSABLE_ROLES, SharedParams, check_linear_keys, one_of, positive_int,
                                 xavier_fan_out)
from kindjax.layers.svd import extend_orthonormal, init_sigma, matrix_shapes, svd_product

#: Keys of ``config.model.linear`` for ``kind="fine"``.
CONFIG_KEYS = ("kind", "rank", "layout")
#: ``config.model.linear.layout`` → the roles it factorizes (``fine_bases/<role>``).
LAYOUTS = {"paper": ("qkv", "attn_out", "mlp_in", "mlp_out", "adaln"),
           "per_role": ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")}
#: Module name of a role's layer in the DiT when it is not the role itself.
LAYER_NAMES = {"adaln": "adaln_modulation"}

#: Name of the top-level module that holds the shared factors (FINE's learngene).
BASES = "fine_bases"


def fine_config(rank: int, layout: str = "paper") -> ml_collections.ConfigDict:
    """``config.model.linear`` for FINE with ``rank`` shared singular components."""
    return ml_collections.ConfigDict(dict(kind="fine", rank=rank, layout=layout))


def fine_layout(linear_config: Mapping) -> str:
    """``config.model.linear.layout`` (``"paper"`` when absent), checked."""
    return one_of(linear_config, "layout", "paper", LAYOUTS, "fine",
                  "'paper': FINE's qkv, o, in, out, adaLN; 'per_role': q, k, v separate, adaLN dense")


def layer_role(layer_name: str) -> str:
    """The role of a FINE layer from its module name (``adaln_modulation`` → ``adaln``)."""
    return {v: k for k, v in LAYER_NAMES.items()}.get(layer_name, layer_name)


def fine_rank(linear_config: Mapping) -> int:
    """``config.model.linear.rank``, checked to be a positive int (and no unknown keys)."""
    check_linear_keys(linear_config, CONFIG_KEYS, "fine")
    return positive_int(linear_config, "rank", "fine", "the number of shared singular components")


def init_bases(key: jax.Array, d_in: int, d_out: int, rank: int) -> dict[str, jax.Array]:
    """``U (d_out, r)`` and ``V (d_in, r)``: the first ``r`` columns of Haar-random orthogonal matrices."""
    key_u, key_v = jax.random.split(key)
    return {"U": extend_orthonormal(key_u, jnp.zeros((d_out, 0)), rank),
            "V": extend_orthonormal(key_v, jnp.zeros((d_in, 0)), rank)}


def fine_linear(x: jax.Array, bases: Mapping[str, jax.Array], sigma: jax.Array, bias: jax.Array,
                dtype: jnp.dtype | None = None) -> jax.Array:
    """``out = x · V diag(σ) Uᵀ + b``, i.e. ``x · W_lᵀ + b`` for ``W_l = U diag(σ_l) Vᵀ`` of shape
    ``(d_out, d_in)``; associated for the fewest multiply-adds (:func:`svd_product`)."""
    dtype = dtype or x.dtype
    factors = {"U": bases["U"], "V": bases["V"], "sigma": sigma}
    return svd_product(x.astype(dtype), factors, dtype) + bias.astype(dtype)


def zero_gate_rows(u: jax.Array, hidden: int) -> jax.Array:
    """``U`` of the adaLN matrix with the rows of the two gates (chunks 2 and 5 of ``[β, γ, α]×2``) set
    to 0: every block's ``α = 0`` at init whatever its ``σ_l``, as adaLN-Zero's, while ``U``, ``V`` and
    ``σ`` start at their trainable scale."""
    for chunk in (2, 5):
        u = u.at[chunk * hidden:(chunk + 1) * hidden].set(0.0)
    return u


class FineBases(nn.Module):
    """The shared factors of every factorized role; ``__call__()`` returns ``{role: {"U", "V"}}``.

    Init: ``U``, ``V`` random with orthonormal columns (:func:`init_bases`); under adaLN-Zero
    (``zero_gates``) the adaLN ``U``'s gate rows are 0 (:func:`zero_gate_rows`).
    """

    shapes: tuple[tuple[str, int, int], ...]   # (role, d_in, d_out)
    rank: int
    zero_gates: bool = False

    @nn.compact
    def __call__(self) -> dict[str, dict[str, jax.Array]]:
        def init(key, role, d_in, d_out):
            bases = init_bases(key, d_in, d_out, self.rank)
            if role == "adaln" and self.zero_gates:
                bases["U"] = zero_gate_rows(bases["U"], d_in)
            return bases

        return {role: self.param(role, init, role, d_in, d_out) for role, d_in, d_out in self.shapes}


class FineLinear(nn.Module):
    """FINE layer ``out = x · V diag(σ_l) Uᵀ + b`` with ``U``, ``V`` lent by :class:`FineBases`.

    Initialisation: ``U``, ``V`` have orthonormal columns, every ``σ_l = sqrt(2·d_in·d_out /
    ((d_in + fan_out)·r))`` and ``b = 0``, so ``‖W_l‖_F² = r·σ² = 2·d_in·d_out/(d_in + fan_out)``,
    the expected squared norm of the dense DiT's xavier-uniform matrix (``fan_out``: ``d_out``, or
    ``3·d_out`` for q, k, v of layout "per_role" under ``model.qkv_init="fused"``): the output
    variance matches the dense DiT layer's, ``2·d_in/(d_in + fan_out)·Var(x)``.  All layers start
    with the same ``W``; they part as their ``σ_l`` (and everything around them) train.
    ``sigma_init`` overrides the value (the adaLN matrix: :func:`adaln_sigma`).
    """

    features: int
    bases: Mapping[str, jax.Array] | None
    role: str = "linear"
    dtype: jnp.dtype | None = None
    sigma_init: float | None = None   # None: the xavier-matching value below
    fan_out: int | None = None        # of that value's xavier variance (None: features)

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        if self.bases is None:
            raise ValueError(f"FineLinear {self.role!r} needs the shared factors U, V: build it through "
                             f"the FINE factory inside a DiT, which passes shared= from its fine_bases")
        u, v = self.bases["U"], self.bases["V"]
        d_in, d_out = x.shape[-1], self.features
        if v.shape[0] != d_in or u.shape[0] != d_out:
            raise ValueError(f"FINE {self.role!r}: shared U {u.shape} and V {v.shape} do not fit a "
                             f"{d_in}→{d_out} matrix")
        value = init_sigma(d_in, d_out, u.shape[1], self.fan_out) if self.sigma_init is None else self.sigma_init
        sigma = self.param("sigma", nn.initializers.constant(value), (u.shape[1],))
        bias = self.param("bias", nn.initializers.zeros, (d_out,))
        return fine_linear(x, self.bases, sigma, bias, self.dtype)


def adaln_sigma(adaln_init: str, adaln_std: tuple[float, ...], d_in: int, d_out: int, rank: int) -> float:
    """Initial ``σ`` of the factorized adaLN matrix.  adaLN-Zero: the xavier-matching value of every
    FINE matrix (:func:`kindjax.layers.svd.init_sigma`), the gates being zeroed in ``U`` instead
    (:func:`zero_gate_rows`) — with ``σ = 0``, ``U`` and ``V`` get no gradient and Adam's fixed step
    leaves ``σ`` far below its working scale for thousands of steps (measured on the digits: sample
    accuracy 0.125 after 1,200 steps against 0.87 with this init; README).  adaLN-Gaussian:
    ``s·sqrt(d_in·d_out/r)`` so that ``‖W‖_F² = r·σ² = d_in·d_out·s²``, the dense matrix's at entry
    std ``s`` (three stds: their RMS, a factorized matrix has one scale)."""
    if adaln_init == "zero":
        return init_sigma(d_in, d_out, rank)
    s = float(np.sqrt(np.mean(np.square(adaln_std))))
    return s * float(np.sqrt(d_in * d_out / rank))


@dataclasses.dataclass(frozen=True)
class FineFactory:
    """The FINE linear factory: one :class:`FineLinear` per matrix, its ``U``, ``V`` from ``shared``;
    ``fused_roles`` asks the DiT for the fused ``qkv`` and the ``adaln`` matrix (layout "paper")."""

    rank: int
    shapes: tuple[tuple[str, int, int], ...]   # (role, d_in, d_out)
    fused_roles: tuple[str, ...] = ()
    adaln_sigma: float = 0.0
    zero_gates: bool = False
    qkv_init: str = "fused"

    @property
    def shared_params(self):
        return SharedParams(name=BASES, module=lambda name: FineBases(self.shapes, self.rank, self.zero_gates,
                                                                      name=name))

    def __call__(self, role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        if shared is None or role not in shared:
            raise ValueError(f"the FINE factory needs the shared factors of role {role!r} (shared=): "
                             f"only the DiT, which builds {BASES!r}, can make FINE layers")
        sigma_init = self.adaln_sigma if role == "adaln" else None
        return FineLinear(features=features, bases=shared[role], role=role, sigma_init=sigma_init,
                          fan_out=xavier_fan_out(role, features, self.qkv_init), name=name)


def check_rank(shapes: Mapping[str, tuple[int, int]], rank: int) -> None:
    """ConfigError if ``rank > min(d_in, d_out)`` for some matrix (the factors could not be orthonormal)."""
    for role, (d_in, d_out) in shapes.items():
        if rank > min(d_in, d_out):
            raise ConfigError(
                f"config.model.linear.rank={rank} does not fit matrix {role!r} (d_in={d_in}, d_out={d_out}): "
                f"FINE needs rank ≤ min(d_in, d_out) = {min(d_in, d_out)}. Lower the rank or widen the model.")


def fine_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """``role → (d_in, d_out)`` of the matrices ``model.linear.layout`` factorizes."""
    shapes = matrix_shapes(model_config)
    hidden = shapes["q"][0]
    shapes.update(qkv=(hidden, 3 * hidden), adaln=(hidden, 6 * hidden))
    return {role: shapes[role] for role in LAYOUTS[fine_layout(model_config.linear)]}


def fine_factory(model_config: ml_collections.ConfigDict) -> FineFactory:
    """FINE layers for the roles of ``model.linear.layout``; refuses a rank that does not fit every matrix."""
    rank = fine_rank(model_config.linear)
    shapes = fine_shapes(model_config)
    check_rank(shapes, rank)
    fused = tuple(role for role in FUSABLE_ROLES if role in shapes)
    adaln = adaln_sigma(model_config.adaln_init, tuple(model_config.adaln_std), *shapes.get("adaln", (1, 1)), rank)
    return FineFactory(rank=rank, shapes=tuple((role, d_in, d_out) for role, (d_in, d_out) in shapes.items()),
                       fused_roles=fused, adaln_sigma=adaln, zero_gates=model_config.adaln_init == "zero",
                       qkv_init=model_config.get("qkv_init", "fused"))
