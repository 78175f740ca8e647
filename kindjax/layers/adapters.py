"""PEFT baselines as linear-layer variants: LoRA, DoRA, PiSSA, OFT, LoHa, SVDiff.

Each layer wraps a frozen pre-trained dense layer ``out = x·W + b`` whose leaves
keep the dense paths (``kernel`` of shape ``(d_in, d_out)``, ``bias``), so a dense
checkpoint maps onto it leaf by leaf.  The trainable leaves sit under ``adapter/``
(select them with ``config.train.trainable = ("/adapter/",)``); SVDiff's frozen
singular factors sit under ``svd/``.  Forward values follow HF ``peft`` 0.21.2 and
its default hyper-parameters.  Matrices are stored for kindjax's row-vector
convention ``x·W``: each is the transpose of peft's (``lora_A`` is ``(d_in, r)``,
peft's ``lora_A.weight`` is ``(r, d_in)``).

Parameter tree of one layer (``k = min(d_in, d_out)``; OFT: ``n·b = d_in``, ``≥`` with ``block_fit="pad"``)::

    lora, pissa  adapter/lora_A (d_in, r)   adapter/lora_B (r, d_out)
    dora         the same + adapter/magnitude (d_out,)
    oft          adapter/Q (n, b(b-1)/2)     (upper triangles of the skew-symmetric blocks)
    loha         adapter/hada_w1_a (r, d_out)  adapter/hada_w1_b (d_in, r)  (and w2_a, w2_b)
    svdiff       svd/U (d_out, k)  svd/sigma (k,)  svd/V (d_in, k)  adapter/delta (k,)
    all          kernel (d_in, d_out)  bias (d_out,)

``config.model.linear`` keys (defaults are peft's): ``rank`` (8) and ``alpha`` (8.0)
for lora/dora/pissa/loha (``scale s = alpha / rank``); for oft either ``r`` (number
of blocks) or ``oft_block_size`` (default 32), plus ``use_cayley_neumann`` (True),
``num_cayley_neumann_terms`` (5) and ``block_fit`` ("peft", or "pad": what to do when
the blocks do not tile ``d_in``, see :func:`oft_blocks`); svdiff has none.

Data-dependent initialisation from a pre-trained dense layer: :data:`FROM_DENSE`
maps a kind to ``from_dense(layer_params, key, linear_config) -> layer_params``,
called on a fresh layer node into which the pre-trained ``kernel`` and ``bias``
have been copied (PiSSA: principal components; DoRA: magnitude; SVDiff: SVD).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.layers.base import VARIANT_KEY, LinearFactory, check_linear_keys, positive_int
from kindjax.layers.svd import matrix_shapes


_LOW_RANK = {"rank": 8, "alpha": 8.0}

#: ``config.model.linear`` keys of each adapter kind (besides ``kind``), with peft's defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": _LOW_RANK,
    "dora": _LOW_RANK,
    "pissa": _LOW_RANK,
    "loha": _LOW_RANK,
    "oft": {"r": 0, "oft_block_size": 32, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5,
            "block_fit": "peft"},
    "svdiff": {},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def adapter_settings(linear_config: Mapping) -> dict[str, Any]:
    """``config.model.linear`` of an adapter kind, checked, with peft's defaults filled in.

    OFT: give ``r`` (blocks per layer) or ``oft_block_size``, not both (peft's rule
    ``r · oft_block_size = d_in``); giving only ``r`` drops the default block size.
    Raises :class:`~kindjax.config.ConfigError` naming the key and the fix.
    """
    kind = linear_config.get(VARIANT_KEY)
    if kind not in DEFAULTS:
        raise ConfigError(f"config.model.linear.kind={kind!r} is not an adapter kind; "
                          f"use one of {sorted(DEFAULTS)}")
    defaults = DEFAULTS[kind]
    given = {k: v for k, v in linear_config.items() if k != VARIANT_KEY}
    check_linear_keys(linear_config, (VARIANT_KEY, *defaults), kind)
    settings = {**defaults, **given}
    if kind == "oft":
        if "r" in given and "oft_block_size" not in given:
            settings["oft_block_size"] = 0
        for key in ("r", "oft_block_size"):
            if not _is_int(settings[key]) or settings[key] < 0:
                raise ConfigError(f"config.model.linear.{key} must be an int ≥ 0 for kind='oft', "
                                  f"got {settings[key]!r}")
        if (settings["r"] > 0) == (settings["oft_block_size"] > 0):
            raise ConfigError(
                f"config.model.linear: give exactly one of r (number of OFT blocks) and oft_block_size "
                f"(block size), since r·oft_block_size = d_in; got r={settings['r']}, "
                f"oft_block_size={settings['oft_block_size']} (set the other to 0)")
        if not isinstance(settings["use_cayley_neumann"], bool):
            raise ConfigError(f"config.model.linear.use_cayley_neumann must be a bool, "
                              f"got {settings['use_cayley_neumann']!r}")
        terms = settings["num_cayley_neumann_terms"]
        if not _is_int(terms) or terms < 1:
            raise ConfigError(f"config.model.linear.num_cayley_neumann_terms must be a positive int, "
                              f"got {terms!r}")
        if settings["block_fit"] not in OFT_BLOCK_FITS:
            raise ConfigError(f"config.model.linear.block_fit={settings['block_fit']!r}: use one of "
                              f"{list(OFT_BLOCK_FITS)} (what OFT does when its blocks do not tile d_in)")
    elif kind != "svdiff":
        positive_int(settings, "rank", kind)
        alpha = settings["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"config.model.linear.alpha must be a positive number for kind={kind!r}, "
                              f"got {alpha!r}")
    return settings


#: OFT's rules for blocks that do not tile ``d_in`` (:func:`oft_blocks`).
OFT_BLOCK_FITS = ("peft", "pad")


def nearest_divisor(d_in: int, size: int) -> int:
    """The divisor of ``d_in`` nearest to ``size``, the smaller one on a tie; ``d_in`` if ``size ≥ d_in``
    (peft 0.21.2's ``adjust_oft_parameters``)."""
    if size >= d_in:
        return d_in
    divisors = [k for k in range(1, d_in + 1) if d_in % k == 0]
    return min(divisors, key=lambda k: (abs(k - size), k))


def oft_blocks(d_in: int, r: int, oft_block_size: int, block_fit: str = "peft",
               role: str = "linear") -> tuple[int, int]:
    """``(n, b)``: ``n`` OFT blocks of size ``b`` acting on a matrix's ``d_in`` inputs, from peft's ``r``
    (blocks) or ``oft_block_size`` (the one that is > 0).

    When the given number does not divide ``d_in``:

    - ``block_fit="peft"`` (HF peft 0.21.2): it is replaced by the divisor of ``d_in`` nearest to it
      (the smaller on a tie; ``d_in`` if it exceeds ``d_in``), so ``n·b = d_in``; e.g. ``r = 21`` on
      ``d_in = 768`` becomes 24 blocks of 32 (peft warns "Adjusted `r`");
    - ``block_fit="pad"``: the number is kept and the other rounded up, ``n·b ≥ d_in``: the input is
      zero-padded to ``n·b`` and the rotated input cut back to ``d_in`` (``R`` cut to its leading
      ``d_in × d_in`` block); e.g. ``r = 21`` on ``d_in = 768`` is 21 blocks of ⌈768/21⌉ = 37.
    """
    given, key = (oft_block_size, "oft_block_size") if oft_block_size > 0 else (r, "r")
    if block_fit == "pad" and given > d_in:
        raise ConfigError(f"config.model.linear.{key}={given} exceeds d_in={d_in} of matrix {role!r}; "
                          f"with block_fit='pad' choose at most {d_in}")
    if block_fit == "peft" and d_in % given:
        given = nearest_divisor(d_in, given)
    other = -(-d_in // given)
    return (given, other) if key == "r" else (other, given)


def _check_pissa_rank(rank: int, d_in: int, d_out: int, role: str) -> None:
    if rank > min(d_in, d_out):
        raise ConfigError(
            f"config.model.linear.rank={rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of matrix "
            f"{role!r}: PiSSA takes the r principal singular components; lower the rank")


# ----------------------------------------------------------------------------- initialisers

def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: torch's ``kaiming_uniform_(a=sqrt(5))`` (peft's default)."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_lora(key: jax.Array, d_in: int, d_out: int, rank: int) -> dict[str, jax.Array]:
    """LoRA factors as peft: ``A`` kaiming-uniform (fan-in ``d_in``), ``B = 0``, so ``ΔW = 0``."""
    return {"lora_A": kaiming_uniform(key, (d_in, rank), d_in),
            "lora_B": jnp.zeros((rank, d_out), jnp.float32)}


def dora_magnitude(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """``‖W + s·A·B‖`` per output feature (the norm over the ``d_in`` inputs of each column); the
    product in the factors' dtype, the norm in f32."""
    return jnp.linalg.norm((kernel + scale * (lora_a @ lora_b)).astype(jnp.float32), axis=0)


def init_dora(key: jax.Array, kernel: jax.Array, rank: int, scale: float) -> dict[str, jax.Array]:
    """LoRA factors plus DoRA's magnitude ``m = ‖W + s·A·B‖`` (``= ‖W‖`` since ``B = 0``)."""
    factors = init_lora(key, kernel.shape[0], kernel.shape[1], rank)
    return {**factors, "magnitude": dora_magnitude(kernel, factors["lora_A"], factors["lora_B"], scale)}


def init_loha(key: jax.Array, d_in: int, d_out: int, rank: int) -> dict[str, jax.Array]:
    """LoHa factors as peft: three kaiming-uniform (fan-in ``r`` for ``w_a``, ``d_in`` for
    ``w1_b``) and ``w2_b = 0``, so ``ΔW = 0``."""
    k1a, k1b, k2a = jax.random.split(key, 3)
    return {"hada_w1_a": kaiming_uniform(k1a, (rank, d_out), rank),
            "hada_w1_b": kaiming_uniform(k1b, (d_in, rank), d_in),
            "hada_w2_a": kaiming_uniform(k2a, (rank, d_out), rank),
            "hada_w2_b": jnp.zeros((d_in, rank), jnp.float32)}


def svd_factors(kernel: jax.Array) -> dict[str, jax.Array]:
    """Thin SVD in float32, ``W = V·diag(σ)·Uᵀ`` for the ``(d_in, d_out)`` kernel: ``U (d_out, k)``,
    ``σ (k,)`` descending, ``V (d_in, k)``, ``k = min(d_in, d_out)``."""
    v, sigma, ut = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    return {"U": ut.T, "sigma": sigma, "V": v}


# ----------------------------------------------------------------------------- maths

def skew_symmetric(upper: jax.Array, block_size: int) -> jax.Array:
    """``Q = M - Mᵀ`` per block, ``M`` holding ``upper`` on the strict upper triangle (row-major,
    peft's order); ``upper`` is ``(n, b(b-1)/2)``, ``Q`` is ``(n, b, b)``."""
    rows, cols = np.triu_indices(block_size, 1)
    m = jnp.zeros((upper.shape[0], block_size, block_size), upper.dtype).at[:, rows, cols].set(upper)
    return m - jnp.swapaxes(m, -1, -2)


def cayley(q: jax.Array, use_neumann: bool, num_terms: int) -> jax.Array:
    """Orthogonal blocks from skew-symmetric ``Q``, with peft's two conventions.

    Exact: ``R = (I - Q)(I + Q)⁻¹``.  Cayley–Neumann (peft's default): the series of
    ``(I + Q)(I - Q)⁻¹`` truncated as peft does, ``R = I + 2Q + 2Q² + … + 2Q^{m-1} + Q^m``
    with ``m = n - 1`` for ``n ≥ 4`` terms (``n = 3`` uses ``m = 3``, ``n = 2`` is ``I + 2Q``,
    ``n = 1`` is ``I``).  (The two conventions are each other's transpose; either is orthogonal.)
    """
    eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    if not use_neumann:
        exact = jnp.linalg.solve((eye + q).astype(jnp.float32), (eye - q).astype(jnp.float32))
        return exact.astype(q.dtype)
    if num_terms == 1:
        return eye
    if num_terms == 2:
        return eye + 2.0 * q
    last = max(num_terms - 1, 3)
    out, power = eye, eye
    for k in range(1, last + 1):
        power = power @ q
        out = out + (1.0 if k == last else 2.0) * power
    return out


def oft_rotate(x: jax.Array, rotation: jax.Array) -> jax.Array:
    """``x·R`` for the block-diagonal ``R = diag(R_1, …, R_n)`` acting on ``x``'s last axis ``d``;
    when ``n·b > d``, ``x`` is zero-padded to ``n·b`` and the result cut to ``d`` (``R[:d, :d]``)."""
    n, b, _ = rotation.shape
    d = x.shape[-1]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * b - d)]) if n * b > d else x
    blocks = padded.reshape(*x.shape[:-1], n, b)
    return jnp.einsum("...nk,nkc->...nc", blocks, rotation).reshape(padded.shape)[..., :d]


def loha_delta(adapter: Mapping[str, jax.Array], scale: float, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``ΔW = s·(w1_b·w1_a) ⊙ (w2_b·w2_a)``, ``(d_in, d_out)`` (peft's ``(W1a W1b) ⊙ (W2a W2b)``, transposed),
    computed in ``dtype``."""
    w = {k: a.astype(dtype) for k, a in adapter.items()}
    return scale * ((w["hada_w1_b"] @ w["hada_w1_a"]) * (w["hada_w2_b"] @ w["hada_w2_a"]))


def svdiff_weight(kernel: jax.Array, svd: Mapping[str, jax.Array], delta: jax.Array,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """SVDiff's ``W' = V·diag(ReLU(σ + δ))·Uᵀ``, computed as ``W + V·diag(ReLU(σ + δ) - σ)·Uᵀ`` in ``dtype``.

    The two agree because ``W = V·diag(σ)·Uᵀ``; the residual form gives ``W`` bit for bit at
    ``δ = 0`` (``ReLU(σ) = σ``), whatever the rounding of the stored SVD.
    """
    shift = jax.nn.relu(svd["sigma"] + delta) - svd["sigma"]
    return kernel.astype(dtype) + (svd["V"].astype(dtype) * shift.astype(dtype)) @ svd["U"].T.astype(dtype)


# ----------------------------------------------------------------------------- layers

class _AdaptedDense(nn.Module):
    """The frozen dense leaves ``kernel`` (xavier-uniform) and ``bias`` (zeros) at the layer root."""

    features: int
    dtype: jnp.dtype | None = None

    def dense_params(self, d_in: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return kernel, bias


class _LowRankAdapted(_AdaptedDense):
    """The frozen dense leaves plus a rank-``r`` update scaled by ``s = α/r`` (LoRA, DoRA, LoHa)."""

    rank: int = 8
    alpha: float = 8.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(_LowRankAdapted):
    """LoRA: ``out = x·W + s·(x·A)·B + b``, ``s = α/r``, i.e. ``W' = W + s·A·B``."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        kernel, bias = self.dense_params(x.shape[-1])
        adapter = self.param("adapter", init_lora, x.shape[-1], self.features, self.rank)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        low_rank = jnp.dot(jnp.dot(x, adapter["lora_A"].astype(dtype)), adapter["lora_B"].astype(dtype))
        return jnp.dot(x, kernel.astype(dtype)) + self.scale * low_rank + bias.astype(dtype)


class PiSSALinear(LoRALinear):
    """PiSSA: LoRA's forward; :func:`pissa_from_dense` puts the ``r`` principal singular
    components of the pre-trained ``W`` in ``A``, ``B`` and keeps the residual as ``W``.
    A fresh layer (no pre-trained ``W``) starts as LoRA does (``B = 0``)."""


class DoRALinear(_LowRankAdapted):
    """DoRA: ``out = (m / ‖W + s·A·B‖) ⊙ (x·W + s·(x·A)·B) + b``, norm per output feature.

    Gradient choice (peft, DoRA §4.3): the norm ``‖W + s·A·B‖`` is a constant for the
    gradient (``stop_gradient``), so ``A``, ``B`` get gradient through the numerator only.
    """

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        scale = self.scale
        kernel, bias = self.dense_params(x.shape[-1])
        adapter = self.param("adapter", init_dora, kernel, self.rank, scale)
        dtype = self.dtype or x.dtype
        factors = {k: adapter[k].astype(dtype) for k in ("lora_A", "lora_B")}
        norm = jax.lax.stop_gradient(dora_magnitude(kernel.astype(dtype), factors["lora_A"], factors["lora_B"],
                                                    scale).astype(jnp.float32))
        x = x.astype(dtype)
        low_rank = jnp.dot(jnp.dot(x, factors["lora_A"]), factors["lora_B"])
        out = jnp.dot(x, kernel.astype(dtype)) + scale * low_rank
        return out * (adapter["magnitude"] / norm).astype(dtype) + bias.astype(dtype)


class OFTLinear(_AdaptedDense):
    """OFT: ``out = (x·R)·W + b``, ``R = diag(R_1, …, R_n)`` orthogonal blocks of size ``b``
    from skew-symmetric ``Q_i`` (:func:`cayley`), applied on the input side as peft does.
    ``Q = 0`` at init, so ``R = I``.  (peft's ``coft``, ``block_share`` and dropout: off.)"""

    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    block_fit: str = "peft"
    role: str = "linear"

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        n, b = oft_blocks(x.shape[-1], self.r, self.oft_block_size, self.block_fit, self.role)
        kernel, bias = self.dense_params(x.shape[-1])
        adapter = self.param("adapter", lambda key: {"Q": jnp.zeros((n, b * (b - 1) // 2), jnp.float32)})
        dtype = self.dtype or x.dtype
        rotation = cayley(skew_symmetric(adapter["Q"].astype(dtype), b), self.use_cayley_neumann,
                          self.num_cayley_neumann_terms)
        x = oft_rotate(x.astype(dtype), rotation)
        return jnp.dot(x, kernel.astype(dtype)) + bias.astype(dtype)


class LoHaLinear(_LowRankAdapted):
    """LoHa: ``out = x·(W + ΔW) + b``, ``ΔW = (α/r)·(w1_b·w1_a) ⊙ (w2_b·w2_a)`` (built once per call)."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        kernel, bias = self.dense_params(x.shape[-1])
        adapter = self.param("adapter", init_loha, x.shape[-1], self.features, self.rank)
        dtype = self.dtype or x.dtype
        weight = kernel.astype(dtype) + loha_delta(adapter, self.scale, dtype)
        return jnp.dot(x.astype(dtype), weight.astype(dtype)) + bias.astype(dtype)


class SVDiffLinear(_AdaptedDense):
    """SVDiff: ``out = x·V·diag(ReLU(σ + δ))·Uᵀ + b`` with ``U, σ, V`` the frozen SVD of the
    pre-trained ``W`` (``svd/``) and the spectral shift ``δ`` (``adapter/delta``, init 0)
    the only trainable leaf; see :func:`svdiff_weight`."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        del y
        kernel, bias = self.dense_params(x.shape[-1])
        svd = self.param("svd", lambda key: svd_factors(kernel))
        adapter = self.param("adapter", lambda key: {"delta": jnp.zeros_like(svd["sigma"])})
        dtype = self.dtype or x.dtype
        weight = svdiff_weight(kernel, svd, adapter["delta"], dtype)
        return jnp.dot(x.astype(dtype), weight.astype(dtype)) + bias.astype(dtype)


# ----------------------------------------------------------------------------- from_dense

def keep_fresh_init(layer_params: dict, key: jax.Array, linear_config: Mapping) -> dict:
    """LoRA, OFT, LoHa: the fresh adapter already gives ``ΔW = 0``; the node is returned unchanged."""
    del key, linear_config
    return layer_params


def pissa_from_dense(layer_params: dict, key: jax.Array, linear_config: Mapping) -> dict:
    """PiSSA's init (peft ``init_lora_weights="pissa"``) from the pre-trained ``W = V·diag(σ)·Uᵀ``.

    ``A = V_r·diag(sqrt(σ_r/s))``, ``B = diag(sqrt(σ_r/s))·U_rᵀ`` (so ``s·A·B`` is the rank-``r``
    principal part) and the kernel becomes the residual ``W - s·A·B``; SVD in float32.
    """
    del key
    settings = adapter_settings(linear_config)
    rank, scale = settings["rank"], settings["alpha"] / settings["rank"]
    kernel = layer_params["kernel"]
    _check_pissa_rank(rank, kernel.shape[0], kernel.shape[1], "linear")
    svd = svd_factors(kernel)
    root = jnp.sqrt(svd["sigma"][:rank] / scale)
    lora_a, lora_b = svd["V"][:, :rank] * root, root[:, None] * svd["U"][:, :rank].T
    residual = kernel.astype(jnp.float32) - scale * (lora_a @ lora_b)
    adapter = {**layer_params["adapter"], "lora_A": lora_a.astype(layer_params["adapter"]["lora_A"].dtype),
               "lora_B": lora_b.astype(layer_params["adapter"]["lora_B"].dtype)}
    return {**layer_params, "kernel": residual.astype(kernel.dtype), "adapter": adapter}


def dora_from_dense(layer_params: dict, key: jax.Array, linear_config: Mapping) -> dict:
    """DoRA's magnitude from the pre-trained kernel: ``m = ‖W + s·A·B‖`` per output feature (peft)."""
    del key
    settings = adapter_settings(linear_config)
    adapter = layer_params["adapter"]
    magnitude = dora_magnitude(layer_params["kernel"], adapter["lora_A"], adapter["lora_B"],
                               settings["alpha"] / settings["rank"])
    return {**layer_params, "adapter": {**adapter, "magnitude": magnitude.astype(adapter["magnitude"].dtype)}}


def svdiff_from_dense(layer_params: dict, key: jax.Array, linear_config: Mapping) -> dict:
    """SVDiff's frozen factors from the pre-trained kernel (``svd/``); ``δ`` is kept (0 when fresh)."""
    del key, linear_config
    return {**layer_params, "svd": svd_factors(layer_params["kernel"])}


#: ``kind → from_dense(layer_params, key, linear_config) -> layer_params`` for the adapter kinds.
FROM_DENSE: dict[str, Callable[[dict, jax.Array, Mapping], dict]] = {
    "lora": keep_fresh_init,
    "dora": dora_from_dense,
    "pissa": pissa_from_dense,
    "oft": keep_fresh_init,
    "loha": keep_fresh_init,
    "svdiff": svdiff_from_dense,
}


# ----------------------------------------------------------------------------- factories

def _adapter_factory(kind: str) -> Callable[[ml_collections.ConfigDict], LinearFactory]:
    """The factory builder for ``kind``: settings checked (and OFT blocks / PiSSA rank for every
    matrix of the DiT) when the factory is built, before anything is traced."""

    def build(model_config: ml_collections.ConfigDict) -> LinearFactory:
        settings = adapter_settings(model_config.linear)
        for role, (d_in, d_out) in matrix_shapes(model_config).items():
            if kind == "oft":
                oft_blocks(d_in, settings["r"], settings["oft_block_size"], settings["block_fit"], role)
            elif kind == "pissa":
                _check_pissa_rank(settings["rank"], d_in, d_out, role)

        def make(role: str, features: int, name: str, shared: Any = None) -> nn.Module:
            del shared
            if kind == "oft":
                return OFTLinear(features=features, role=role, name=name, **settings)
            if kind == "svdiff":
                return SVDiffLinear(features=features, name=name)
            return _LOW_RANK_LAYERS[kind](features=features, name=name, **settings)

        return make

    build.__doc__ = f"{kind} adapter layers (kindjax.layers.adapters) for all six matrices."
    return build


_LOW_RANK_LAYERS = {"lora": LoRALinear, "dora": DoRALinear, "pissa": PiSSALinear, "loha": LoHaLinear}

#: ``kind → build(model_config) → factory`` for the adapter kinds (registered by :mod:`kindjax.layers`).
FACTORIES = {kind: _adapter_factory(kind) for kind in FROM_DENSE}
