"""KIND: a linear layer decomposed into a learngene and per-class tailors.

Every matrix is ``W = U · diag(σ) · Vᵀ`` (``U`` of shape ``(d_out, r)``, ``V`` of
shape ``(d_in, r)``) with ``r = N_cls·N_T + N_G`` components: ``N_G`` learngene
components shared by all classes and one tailor of ``N_T`` components per class.
A sample of class ``c`` uses ``W_c = U_G diag(σ_G) V_Gᵀ + U_T[c] diag(σ_T[c]) V_T[c]ᵀ``
(the class gate); the null class ``c = N_cls`` of classifier-free guidance uses the
learngene alone.  Gradients therefore reach only the learngene and the tailors of
the classes present in a batch.

Parameter tree of one layer (a path says what a leaf is: a ``tailors`` component
means a tailor leaf whose leading axis is the class; everything else is learngene)::

    learngene/U      (d_out, N_G)          tailors/U      (N_cls, d_out, N_T)
    learngene/sigma  (N_G,)                tailors/sigma  (N_cls, N_T)
    learngene/V      (d_in, N_G)           tailors/V      (N_cls, d_in, N_T)
    bias             (d_out,)
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kindjax.archs import resolve_dims
from kindjax.layers.base import LinearFactory, check_linear_keys, gated_sum, one_of, positive_int, xavier_fan_out
from kindjax.layers.svd import extend_orthonormal, init_sigma, matrix_shapes, svd_product
from kindjax.models.attention import on_each_device, platform_of
from kindjax.papers.kind.kernel import grouped_product, interpreted, sample_mask
from kindjax.papers.kind.mlp_kernel import grouped_mlp


#: Keys of ``config.model.linear`` for ``kind="kind"``; ``N_cls`` is ``model.num_classes``.
CONFIG_KEYS = ("kind", "n_learngene", "n_tailor", "formulation", "group_size")

#: ``config.model.linear.formulation``: how the class gate is computed, all with the same values.
#: ``gated``: the learngene as one product shared by the batch, each sample's tailor as its own
#: rank-``N_T`` product (:func:`kind_linear`).  ``grouped``: the samples in groups of ``group_size``,
#: the learngene and the group's tailors as one wider product (:func:`grouped_kind_linear`; one pass
#: over the activations and no rank-``N_T`` product; docs/benchmarks.md compares both on TPU).  ``fused``:
#: grouped, each pass's two products one Pallas TPU kernel (:mod:`kindjax.papers.kind.kernel`).  ``fused_mlp``:
#: grouped, each block's whole MLP half in Pallas TPU kernels (:func:`kind_mlp`).  ``naive``: one
#: full-rank weight per sample (about twice the FLOPs or more; a reference and benchmark baseline).
#: ``ungated`` is KIND's ablation #3: every sample uses every tailor (no class gate).  ``auto``: ``grouped`` on a
#: TPU, where its step is the cheaper by the pre-flight (docs/benchmarks.md), ``gated`` elsewhere (the faster
#: on a CPU; on a GPU neither is measured yet): :func:`applied_formulation`.
FORMULATIONS = ("auto", "gated", "grouped", "fused", "fused_mlp", "naive", "ungated")

#: ``config.model.linear.group_size`` of ``formulation="grouped"``: samples whose tailors share one
#: product (``N_G + group_size·N_T`` columns; 16 keeps DiT-B's 297 + 48 and DiT-L's 396 + 64 inside the
#: 384 and 512 that a 128-wide matrix unit computes for the learngene alone).
GROUP_SIZE = 16

#: The grouped product's ``K = N_G + G·N_T`` is padded with zero components to a multiple of this: the
#: width of a TPU's matrix unit (and of 8 of a GPU's tensor-core tiles), which computes the padding anyway;
#: an unpadded ``K`` makes XLA:TPU lay the activations out token-minor and copy them into the attention's layout.
MATRIX_UNIT = 128


def kind_config(n_learngene: int, n_tailor: int, formulation: str = "gated",
                group_size: int | None = None) -> ml_collections.ConfigDict:
    """``config.model.linear`` for KIND with ``N_G`` and ``N_T`` (``N_cls`` = ``model.num_classes``);
    ``group_size`` only when given (absent: :data:`GROUP_SIZE`; so configs and the fingerprints of runs
    made before the key existed stay as they were)."""
    linear = dict(kind="kind", n_learngene=n_learngene, n_tailor=n_tailor, formulation=formulation)
    return ml_collections.ConfigDict(linear if group_size is None else {**linear, "group_size": group_size})


def kind_formulation(linear_config: Mapping) -> str:
    """``config.model.linear.formulation`` (default ``"gated"``), checked against :data:`FORMULATIONS`."""
    return one_of(linear_config, "formulation", "gated", FORMULATIONS, "kind")


def applied_formulation(formulation: str, x: jax.Array) -> str:
    """The formulation that computes on ``x``: ``formulation``, with ``auto`` resolved by ``x``'s platform
    (:func:`~kindjax.models.attention.platform_of`: a step lowered for compile-only TPU devices says ``tpu``)."""
    if formulation != "auto":
        return formulation
    return "grouped" if platform_of(x) == "tpu" else "gated"


def is_class_gated(linear_config: Mapping) -> bool:
    """A sample of class ``c`` reaches only the learngene and tailor ``c`` (not ablation #3)."""
    return kind_formulation(linear_config) != "ungated"


def kind_sizes(model_config: Mapping) -> tuple[int, int, int]:
    """``(N_cls, N_T, N_G)``: ``model.num_classes`` and ``model.linear``'s sizes, each a positive int."""
    linear_config = model_config["linear"]
    if "n_classes" in linear_config:
        raise ValueError("config.model.linear.n_classes is not a key: KIND has one tailor per class of "
                         "model.num_classes; remove n_classes and set model.num_classes")
    check_linear_keys(linear_config, CONFIG_KEYS, "kind")
    return (model_config["num_classes"], positive_int(linear_config, "n_tailor", "kind"),
            positive_int(linear_config, "n_learngene", "kind"))


def _check_fits(d_in: int, d_out: int, n_classes: int, n_tailor: int, n_learngene: int,
                role: str) -> int:
    """The rank ``r = N_cls·N_T + N_G``; ValueError if ``r > min(d_in, d_out)``."""
    rank = n_classes * n_tailor + n_learngene
    if rank > min(d_in, d_out):
        raise ValueError(
            f"KIND rank does not fit matrix {role!r} (d_in={d_in}, d_out={d_out}): "
            f"r = N_cls·N_T + N_G = {n_classes}·{n_tailor} + {n_learngene} = {rank} > "
            f"min(d_in, d_out) = {min(d_in, d_out)}. Lower config.model.linear.n_tailor or "
            f"n_learngene, or widen the model.")
    return rank


def check_rank(d_in: int, d_out: int, model_config: Mapping, role: str) -> int:
    """Validates that ``r = N_cls·N_T + N_G ≤ min(d_in, d_out)`` for one matrix; returns ``r``."""
    n_classes, n_tailor, n_learngene = kind_sizes(model_config)
    return _check_fits(d_in, d_out, n_classes, n_tailor, n_learngene, role)


def init_learngene(key: jax.Array, d_in: int, d_out: int, n_learngene: int,
                   sigma: float) -> dict[str, jax.Array]:
    """Learngene factors: ``U_G``, ``V_G`` random with orthonormal columns, ``σ_G = sigma``."""
    key_u, key_v = jax.random.split(key)
    return {"U": extend_orthonormal(key_u, jnp.zeros((d_out, 0)), n_learngene),
            "sigma": jnp.full((n_learngene,), sigma, jnp.float32),
            "V": extend_orthonormal(key_v, jnp.zeros((d_in, 0)), n_learngene)}


def init_tailors(key: jax.Array, learngene: Mapping[str, jax.Array], n_classes: int,
                 n_tailor: int, sigma: float) -> dict[str, jax.Array]:
    """Tailor factors, orthonormal to each other and to ``learngene``; ``σ_T = sigma``.

    Class ``c`` owns components ``c·N_T … (c+1)·N_T - 1`` of the ``N_cls·N_T``
    tailor columns (KIND eq. 6).  Also the fresh tailors of a transferred learngene.
    """
    key_u, key_v = jax.random.split(key)

    def per_class(columns: jax.Array) -> jax.Array:
        return columns.reshape(columns.shape[0], n_classes, n_tailor).transpose(1, 0, 2)

    total = n_classes * n_tailor
    return {"U": per_class(extend_orthonormal(key_u, learngene["U"], total)),
            "sigma": jnp.full((n_classes, n_tailor), sigma, jnp.float32),
            "V": per_class(extend_orthonormal(key_v, learngene["V"], total))}


def kind_linear(x: jax.Array, y: jax.Array, learngene: Mapping[str, jax.Array],
                tailors: Mapping[str, jax.Array], bias: jax.Array,
                dtype: jnp.dtype | None = None) -> jax.Array:
    """Class-gated product, efficient form, for ``x`` of shape ``(B, ..., d_in)``.

    ``out_b = x_b·W_G + ((x_b·V_T[c_b]) ⊙ σ_T[c_b]·[y_b < N_cls])·U_T[c_b]ᵀ + b`` with
    ``W_G = V_G diag(σ_G) U_Gᵀ`` shared by the whole batch (:func:`learngene_product`)
    and ``c_b = clip(y_b, 0, N_cls - 1)``: the null class ``y_b = N_cls`` gets no
    tailor.  No weight is built per sample.  Computes in ``dtype`` (default ``x.dtype``).
    """
    dtype = dtype or x.dtype
    n_classes = tailors["sigma"].shape[0]
    c = jnp.clip(y, 0, n_classes - 1)
    gate = jnp.where((y < n_classes)[:, None], tailors["sigma"][c], 0.0)
    gate = jnp.expand_dims(gate, tuple(range(1, x.ndim - 1)))
    x = x.astype(dtype)
    h = jnp.einsum("b...i,bik->b...k", x, tailors["V"][c].astype(dtype)) * gate.astype(dtype)
    tailor = jnp.einsum("b...k,bok->b...o", h, tailors["U"][c].astype(dtype))
    return svd_product(x, learngene, dtype) + tailor + bias.astype(dtype)


def group_columns(learngene: Mapping[str, jax.Array], tailors: Mapping[str, jax.Array], bias: jax.Array,
                  y: jax.Array, group: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, tuple[int, int, int]]:
    """``(V_c, U_c, (N_G, N_T, width))`` of :func:`grouped_kind_linear` for the batch's labels ``y`` in groups
    of ``group`` samples: ``V_c`` ``(groups, K, d_in)`` holds ``[V_G | V_T[c_1] | … | V_T[c_G] | 0]`` and ``U_c``
    ``(groups, K, d_out)`` holds ``[U_G σ_G | U_T[c_1] σ_T[c_1] | … | b | 0]`` (``σ_T[c] = 0`` for the null class;
    the bias on component ``width = N_G + G·N_T``), ``K`` padded to a multiple of :data:`MATRIX_UNIT`."""
    n_classes, n_tailor = tailors["sigma"].shape
    n_learngene = learngene["sigma"].shape[0]
    groups = y.shape[0] // group
    c = jnp.clip(y, 0, n_classes - 1)
    width = n_learngene + group * n_tailor      # component ``width`` carries the bias
    padding = -(width + 1) % MATRIX_UNIT

    def columns(learngene_part: jax.Array, tailor_part: jax.Array, scale: jax.Array | None = None,
                bias_row: jax.Array | None = None) -> jax.Array:
        """``(groups, K, d)``: the learngene's components, each sample's tailor in turn, ``bias_row`` (or
        zeros), zeros up to ``K``; the components times ``scale`` (``(groups, width)``) when given."""
        d = learngene_part.shape[0]
        per_sample = tailor_part[c].reshape(groups, group, d, n_tailor).transpose(0, 1, 3, 2)
        stacked = jnp.concatenate([jnp.broadcast_to(learngene_part.T, (groups, n_learngene, d)),
                                   per_sample.reshape(groups, group * n_tailor, d)], axis=1)
        if scale is not None:
            stacked = stacked * scale[:, :, None]
        extra = jnp.zeros((1 + padding, d), stacked.dtype)
        if bias_row is not None:
            extra = extra.at[0].set(bias_row)
        return jnp.concatenate([stacked, jnp.broadcast_to(extra, (groups,) + extra.shape)], axis=1).astype(dtype)

    sigma_t = jnp.where((y < n_classes)[:, None], tailors["sigma"][c], 0.0).reshape(groups, group * n_tailor)
    sigma = jnp.concatenate([jnp.broadcast_to(learngene["sigma"], (groups, n_learngene)), sigma_t], axis=1)
    return (columns(learngene["V"], tailors["V"]), columns(learngene["U"], tailors["U"], sigma, bias),
            (n_learngene, n_tailor, width))


def grouped_kind_linear(x: jax.Array, y: jax.Array, learngene: Mapping[str, jax.Array],
                        tailors: Mapping[str, jax.Array], bias: jax.Array, dtype: jnp.dtype | None = None,
                        group_size: int = GROUP_SIZE, kernel: bool = False, residual: jax.Array | None = None,
                        gate: jax.Array | None = None) -> jax.Array:
    """Class-gated product, grouped form: the same values as :func:`kind_linear`.

    The batch is cut into groups of ``G = gcd(B, group_size)`` samples ``b_1 … b_G``.  A group's
    tokens go through one product ``h = x·[V_G | V_T[c_1] | … | V_T[c_G] | 0]`` (``K = N_G + G·N_T``
    components, zero-padded to a multiple of :data:`MATRIX_UNIT`); sample ``b_j`` keeps the learngene's
    columns and its own tailor's (``h ⊙ m_j``), and
    ``out = [h ⊙ m | 1 | 0]·[U_G σ_G | U_T[c_1] σ_T[c_1] | … | U_T[c_G] σ_T[c_G] | b | 0]ᵀ``
    (:func:`group_columns`): the bias rides on the first padding component, whose ``h`` is 1,
    so its gradient comes out of the ``U`` product's and no pass over the output sums it.  The activations
    are read once, as a dense layer reads them; the ``G·N_T`` tailor columns are the extra work.  With
    ``kernel``, both products of a pass run as one Pallas kernel (:mod:`kindjax.papers.kind.kernel`), ``h``
    kept on chip.  With ``residual`` (shaped as the output) and ``gate`` (``(B, d_out)``), the result is
    ``residual + gate ⊙ out``, summed in the grouped layout so that XLA fuses it into the product (a
    reshape between them stops it: one pass over the output fewer, its backward too).
    """
    dtype = dtype or x.dtype
    d_in, d_out = x.shape[-1], learngene["U"].shape[0]
    batch, tokens = x.shape[0], math.prod(x.shape[1:-1])
    group = math.gcd(batch, group_size)
    groups = batch // group
    v, u, widths = group_columns(learngene, tailors, bias, y, group, dtype)
    if kernel:
        out = grouped_product(x.astype(dtype).reshape(groups, group * tokens, d_in), v.transpose(0, 2, 1), u,
                              *widths, tokens)
        out = out.reshape(groups, group, tokens, d_out)
    else:   # sample s of a group keeps the learngene's components and its own tailor's; the bias component is 1
        h = jnp.einsum("gsni,gki->gsnk", x.astype(dtype).reshape(groups, group, tokens, d_in), v)
        h = sample_mask(h, jnp.arange(group).reshape(1, group, 1, 1), *widths, 1.0)
        out = jnp.einsum("gsnk,gko->gsno", h, u)
    if residual is not None:
        out = residual.reshape(out.shape) + gate.reshape(groups, group, 1, d_out) * out
    return out.reshape(x.shape[:-1] + (d_out,))


def naive_kind_linear(x: jax.Array, y: jax.Array, learngene: Mapping[str, jax.Array],
                      tailors: Mapping[str, jax.Array], bias: jax.Array,
                      dtype: jnp.dtype | None = None) -> jax.Array:
    """Class-gated product, naive form: the same values as :func:`kind_linear`.

    Materialises every sample's full-rank masked weight ``W_b = V diag(σ ⊙ m_{y_b}) Uᵀ``
    (``(B, d_in, d_out)``, over all ``r`` components; ``m_c`` keeps the learngene and
    tailor ``c``, the null class keeps the learngene alone) in the parameter dtype,
    then applies it with one batched product (everything in ``dtype``).
    """
    dtype = dtype or x.dtype
    n_classes, n_tailor = tailors["sigma"].shape

    def columns(factor: jax.Array) -> jax.Array:   # (N_cls, d, N_T) → (d, N_cls·N_T), class-major
        return factor.transpose(1, 0, 2).reshape(factor.shape[1], -1)

    u = jnp.concatenate([learngene["U"], columns(tailors["U"])], axis=1)
    v = jnp.concatenate([learngene["V"], columns(tailors["V"])], axis=1)
    owner = jnp.repeat(jnp.arange(n_classes), n_tailor)
    mask = jnp.concatenate([jnp.ones((y.shape[0], learngene["sigma"].shape[0]), bool),
                            owner[None, :] == y[:, None]], axis=1)
    sigma = jnp.concatenate([learngene["sigma"], tailors["sigma"].reshape(-1)])
    weights = jnp.einsum("ir,br,or->bio", v.astype(dtype), jnp.where(mask, sigma, 0.0).astype(dtype),
                         u.astype(dtype))
    out = jnp.einsum("b...i,bio->b...o", x.astype(dtype), weights)
    return out + bias.astype(dtype)


def ungated_kind_linear(x: jax.Array, y: jax.Array, learngene: Mapping[str, jax.Array],
                        tailors: Mapping[str, jax.Array], bias: jax.Array,
                        dtype: jnp.dtype | None = None) -> jax.Array:
    """Without the class gate (KIND ablation #3): ``out = x·(W_G + Σ_c V_T[c] diag(σ_T[c]) U_T[c]ᵀ) + b``
    for every sample, the tailors acting as one low-rank adapter of rank ``N_cls·N_T``."""
    del y
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    h = jnp.einsum("...i,cik->...ck", x, tailors["V"].astype(dtype)) * tailors["sigma"].astype(dtype)
    tailor = jnp.einsum("...ck,cok->...o", h, tailors["U"].astype(dtype))
    return svd_product(x, learngene, dtype) + tailor + bias.astype(dtype)


_APPLY = {"gated": kind_linear, "grouped": grouped_kind_linear,
          "fused": functools.partial(grouped_kind_linear, kernel=True), "naive": naive_kind_linear,
          "ungated": ungated_kind_linear}


class KINDLinear(nn.Module):
    """KIND layer ``out = x·W_yᵀ + b``, ``W_y = U_G diag(σ_G) V_Gᵀ + U_T[y] diag(σ_T[y]) V_T[y]ᵀ``.

    Initialisation (``k = N_G + N_T`` components used by a conditioned sample):
    ``[U_G | U_T]`` and ``[V_G | V_T]`` are the first ``r`` columns of Haar-random
    orthogonal matrices (one joint QR each), every ``σ = sqrt(2·d_in·d_out / ((d_in +
    fan_out)·k))`` and ``b = 0``, so ``‖W_c‖_F²`` equals the expected value for the
    dense DiT's xavier-uniform matrix and the output variance of a class-conditioned
    sample matches the dense DiT layer's, ``2·d_in/(d_in + fan_out)·Var(x)``
    (``fan_out``: ``d_out``, or ``3·d_out`` for q, k, v under ``model.qkv_init="fused"``, thirds
    of DiT's fused qkv matrix).  The null class keeps ``N_G/k`` of that variance.  (KIND only
    says "randomly initialize".)
    """

    features: int
    n_classes: int
    n_tailor: int
    n_learngene: int
    role: str = "linear"
    formulation: str = "gated"
    group_size: int = GROUP_SIZE
    dtype: jnp.dtype | None = None
    fan_out: int | None = None   # None: features

    #: Takes ``residual=`` and ``gate=`` (:func:`kindjax.models.dit.gated_residual`).
    applies_residual = True

    @nn.compact
    def factors(self, d_in: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
        """``(learngene, tailors, bias)`` of this layer for inputs ``d_in`` wide (created at init)."""
        d_out = self.features
        _check_fits(d_in, d_out, self.n_classes, self.n_tailor, self.n_learngene, self.role)
        sigma = init_sigma(d_in, d_out, self.n_learngene + self.n_tailor, self.fan_out)
        learngene = self.param("learngene", init_learngene, d_in, d_out, self.n_learngene, sigma)
        tailors = self.param("tailors", init_tailors, learngene, self.n_classes, self.n_tailor, sigma)
        return learngene, tailors, self.param("bias", nn.initializers.zeros, (d_out,))

    def __call__(self, x: jax.Array, y: jax.Array, residual: jax.Array | None = None,
                 gate: jax.Array | None = None) -> jax.Array:
        """``x·W_yᵀ + b``, or ``residual + gate ⊙ (x·W_yᵀ + b)`` (``gate``: ``(B, d_out)``) when ``residual``
        is given: in the grouped layout for ``grouped`` and ``fused``."""
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"KINDLinear formulation={self.formulation!r}: use one of {list(FORMULATIONS)}")
        formulation = applied_formulation(self.formulation, x)
        learngene, tailors, bias = self.factors(x.shape[-1])
        if formulation in ("grouped", "fused"):
            return _APPLY[formulation](x, y, learngene, tailors, bias, self.dtype, self.group_size,
                                       residual=residual, gate=gate)
        out = _APPLY[formulation](x, y, learngene, tailors, bias, self.dtype)
        return out if residual is None else gated_sum(residual, gate, out)


def kind_mlp(mlp_in: KINDLinear, mlp_out: KINDLinear, x: jax.Array, y: jax.Array, shift: jax.Array,
             scale: jax.Array, gate: jax.Array, eps: float) -> jax.Array:
    """A DiT block's MLP half, ``x + gate ⊙ mlp_out(gelu(mlp_in(LN(x)·(1 + scale) + shift)))``, as the Pallas
    kernels of :mod:`kindjax.papers.kind.mlp_kernel` on the grouped columns (:func:`group_columns`) of the two
    layers: ``formulation="fused_mlp"``'s (:func:`kindjax.layers.base.fused_mlp`)."""
    dtype = mlp_in.dtype or x.dtype
    batch, tokens, d = x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1]
    group = math.gcd(batch, mlp_in.group_size)
    groups = batch // group
    learngene_in, tailors_in, bias_in = mlp_in.factors(d)
    learngene_out, tailors_out, bias_out = mlp_out.factors(mlp_in.features)
    v_in, u_in, widths_in = group_columns(learngene_in, tailors_in, bias_in, y, group, dtype)
    v_out, u_out, widths_out = group_columns(learngene_out, tailors_out, bias_out, y, group, dtype)
    interpret = interpreted(x, tokens, "fused_mlp")

    def local(x, shift, scale, gate, v_in, u_in, v_out, u_out):
        return grouped_mlp(x, shift, scale, gate, v_in, u_in, v_out, u_out, widths_in, widths_out, tokens, eps,
                         interpret)

    rows = [a.astype(dtype)[:, None] for a in (shift, scale, gate)]
    out = on_each_device(
        local, (x.astype(dtype).reshape(groups, group * tokens, d), *rows, v_in.transpose(0, 2, 1), u_in,
                v_out.transpose(0, 2, 1), u_out),
        lambda batch_axes, devices: f"formulation='fused_mlp' splits its {groups} groups over the mesh axes "
                                    f"{batch_axes} ({devices} devices); use a per-device batch divisible by "
                                    f"model.linear.group_size")
    return out.reshape(x.shape).astype(x.dtype)


def kind_factory(model_config: ml_collections.ConfigDict) -> LinearFactory:
    """KIND layers for all six matrices, one tailor per class of ``model.num_classes``;
    refuses ranks that do not fit."""
    n_classes, n_tailor, n_learngene = kind_sizes(model_config)
    formulation = kind_formulation(model_config.linear)
    group_size = (positive_int(model_config.linear, "group_size", "kind", "samples per grouped product")
                  if "group_size" in model_config.linear else GROUP_SIZE)
    qkv_init = model_config.get("qkv_init", "fused")
    for role, (d_in, d_out) in matrix_shapes(model_config).items():
        check_rank(d_in, d_out, model_config, role)

    def factory(formulation: str) -> LinearFactory:
        def make(role: str, features: int, name: str, shared: None = None) -> nn.Module:
            return KINDLinear(features=features, n_classes=n_classes, n_tailor=n_tailor,
                              n_learngene=n_learngene, role=role, formulation=formulation,
                              group_size=group_size, fan_out=xavier_fan_out(role, features, qkv_init), name=name)
        return make

    if formulation == "fused_mlp":   # the other matrices grouped; the block's MLP half as kernels
        make = factory("grouped")
        make.fused_mlp = kind_mlp
        make.counted_twin = factory("grouped")
        return make
    make = factory(formulation)
    if formulation == "fused":   # the same products in XLA, for FLOP counts
        make.counted_twin = factory("grouped")
    return make
