"""The grouped KIND product as one Pallas TPU kernel per pass: ``h`` never leaves the chip's VMEM.

For one group of ``G`` samples (:func:`kindjax.papers.kind.layer.grouped_kind_linear`), with the group's
columns ``V_c`` (``d_in × K``) and ``U_c`` (``K × d_out``, σ and the bias folded in) and sample ``j``'s
tokens ``x_j`` (``T × d_in``):

    forward   h_j = mask_j(x_j·V_c),  out_j = h_j·U_c
    backward  dh_j = mask_j(dout_j·U_cᵀ),  dx_j = dh_j·V_cᵀ,  dV_c = Σ_j x_jᵀ·dh_j,  dU_c = Σ_j h_jᵀ·dout_j

``mask_j`` keeps the learngene's components and sample ``j``'s tailor, and sets the bias component to 1
(``dh`` there to 0).  One grid step is one sample's tokens: its mask is one row pattern.  The dense layer
reads ``x`` and writes ``out`` once per pass, and so does each kernel; XLA's separate products also write
and read ``h`` (forward) and ``dh`` (backward).  Off a TPU the kernels run in Pallas's interpret mode
(tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kindjax.models.attention import on_each_device, platform_of

#: Scoped VMEM the kernels may use: a group's two column blocks, their f32 gradient accumulators and
#: one sample's activations (DiT-L's MLP matrices at K = 512: about 40 MiB double-buffered).
VMEM_LIMIT_BYTES = 64 * 2 ** 20


def sample_mask(h: jax.Array, sample: jax.Array, n_learngene: int, n_tailor: int, width: int,
                bias_value: float) -> jax.Array:
    """``h`` (``…, K``, components last) with only the learngene's components and sample ``sample``'s tailor
    kept (``sample``: its index in the group, broadcast against ``h``), the bias component (``width``) set
    to ``bias_value`` and the padding zeroed: ``mask_j`` of the module docstring."""
    component = jax.lax.broadcasted_iota(jnp.int32, h.shape, h.ndim - 1)
    own = (component < n_learngene) | ((component >= n_learngene) & (component < width)
                                       & ((component - n_learngene) // n_tailor == sample))
    return jnp.where(component == width, jnp.asarray(bias_value, h.dtype), jnp.where(own, h, 0))


def accumulator(dtype: jnp.dtype) -> jnp.dtype:
    """Products accumulate in f32 (f64 for f64 inputs: the tests' oracle comparisons)."""
    return jnp.promote_types(dtype, jnp.float32)


def _forward_kernel(x_ref, v_ref, u_ref, out_ref, *, n_learngene, n_tailor, width):
    acc = accumulator(x_ref.dtype)
    h = jnp.dot(x_ref[...], v_ref[...], preferred_element_type=acc)
    h = sample_mask(h, pl.program_id(1), n_learngene, n_tailor, width, 1.0).astype(u_ref.dtype)
    out_ref[...] = jnp.dot(h, u_ref[...], preferred_element_type=acc).astype(out_ref.dtype)


def _backward_kernel(x_ref, v_ref, u_ref, dout_ref, dx_ref, dv_ref, du_ref, *, n_learngene, n_tailor, width):
    sample = pl.program_id(1)

    @pl.when(sample == 0)
    def _():
        dv_ref[...] = jnp.zeros_like(dv_ref)
        du_ref[...] = jnp.zeros_like(du_ref)

    x, v, u, dout = x_ref[...], v_ref[...], u_ref[...], dout_ref[...]
    acc = accumulator(x.dtype)
    h = sample_mask(jnp.dot(x, v, preferred_element_type=acc), sample, n_learngene, n_tailor, width, 1.0)
    dh = jax.lax.dot_general(dout, u, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    dh = sample_mask(dh, sample, n_learngene, n_tailor, width, 0.0).astype(x.dtype)
    dx_ref[...] = jax.lax.dot_general(dh, v, (((1,), (1,)), ((), ())),
                                      preferred_element_type=acc).astype(dx_ref.dtype)
    dv_ref[...] += jax.lax.dot_general(x, dh, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    du_ref[...] += jax.lax.dot_general(h.astype(dout.dtype), dout, (((0,), (0,)), ((), ())),
                                       preferred_element_type=acc)


def sample_rows(tokens: int, d: int) -> pl.BlockSpec:
    """Over the grid ``(group g, sample j)``: sample ``j``'s ``tokens`` rows of a ``(groups, G·T, d)`` array."""
    return pl.BlockSpec((None, tokens, d), lambda g, j: (g, j, 0))


def column_block(a: int, b: int) -> pl.BlockSpec:
    """Over the grid ``(group g, sample j)``: group ``g``'s ``(a, b)`` column block (fetched once per group)."""
    return pl.BlockSpec((None, a, b), lambda g, j: (g, 0, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, semantics, flops, bytes_accessed, interpret):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed))


def _size(*arrays: jax.Array) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def fused_grouped_product(x: jax.Array, v: jax.Array, u: jax.Array, n_learngene: int, n_tailor: int,
                          width: int, tokens: int, interpret: bool) -> jax.Array:
    """``out`` (``(groups, G·T, d_out)``) of ``x`` (``(groups, G·T, d_in)``, each sample's ``T`` tokens in
    turn), ``v`` (``(groups, d_in, K)``) and ``u`` (``(groups, K, d_out)``): the module docstring's forward."""
    return _forward(x, v, u, n_learngene, n_tailor, width, tokens, interpret)


def _forward(x, v, u, n_learngene, n_tailor, width, tokens, interpret):
    (groups, rows_per_group, d_in), (k, d_out) = x.shape, u.shape[1:]
    group = rows_per_group // tokens
    out_shape = jax.ShapeDtypeStruct((groups, rows_per_group, d_out), x.dtype)
    kernel = functools.partial(_forward_kernel, n_learngene=n_learngene, n_tailor=n_tailor, width=width)
    return _call(kernel, (groups, group), [sample_rows(tokens, d_in), column_block(d_in, k), column_block(k, d_out)],
                 sample_rows(tokens, d_out), out_shape,
                 ("parallel", "parallel"), 2 * groups * rows_per_group * k * (d_in + d_out),
                 _size(x, v, u) + groups * rows_per_group * d_out * x.dtype.itemsize, interpret)(x, v, u)


def _forward_rule(x, v, u, n_learngene, n_tailor, width, tokens, interpret):
    return _forward(x, v, u, n_learngene, n_tailor, width, tokens, interpret), (x, v, u)


def _backward_rule(n_learngene, n_tailor, width, tokens, interpret, residuals, dout):
    x, v, u = residuals
    (groups, rows_per_group, d_in), (k, d_out) = x.shape, u.shape[1:]
    group = rows_per_group // tokens
    acc = accumulator(x.dtype)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(v.shape, acc),
                 jax.ShapeDtypeStruct(u.shape, acc))
    kernel = functools.partial(_backward_kernel, n_learngene=n_learngene, n_tailor=n_tailor, width=width)
    dx, dv, du = _call(kernel, (groups, group),
                       [sample_rows(tokens, d_in), column_block(d_in, k), column_block(k, d_out),
                        sample_rows(tokens, d_out)],
                       (sample_rows(tokens, d_in), column_block(d_in, k), column_block(k, d_out)), out_shape,
                       ("parallel", "arbitrary"),
                       2 * groups * rows_per_group * k * (3 * d_in + 2 * d_out),
                       2 * _size(x) + _size(v, u, dout) + 4 * (v.size + u.size), interpret)(x, v, u, dout)
    return dx, dv.astype(v.dtype), du.astype(u.dtype)


fused_grouped_product.defvjp(_forward_rule, _backward_rule)


#: Rows of a bf16 block a TPU kernel takes without padding: a sample's tokens must be a multiple.
SUBLANES = 16


def interpreted(x: jax.Array, tokens: int, formulation: str) -> bool:
    """Whether ``formulation``'s kernels on ``x`` run in interpret mode (off a TPU: :func:`platform_of`);
    ValueError on a TPU when a sample's ``tokens`` (one kernel grid step) are not a multiple of :data:`SUBLANES`."""
    interpret = platform_of(x) != "tpu"
    if not interpret and tokens % SUBLANES:
        raise ValueError(f"formulation={formulation!r} runs one sample's {tokens} tokens per kernel step, which a "
                         f"TPU tiles in multiples of {SUBLANES}; use formulation='grouped' for this model")
    return interpret


def grouped_product(x: jax.Array, v: jax.Array, u: jax.Array, n_learngene: int, n_tailor: int, width: int,
                    tokens: int) -> jax.Array:
    """:func:`fused_grouped_product`, in interpret mode off a TPU (:func:`~kindjax.models.attention.platform_of`),
    each device on its groups (:func:`~kindjax.models.attention.on_each_device`)."""
    interpret = interpreted(x, tokens, "fused")

    def local(x, v, u):
        return fused_grouped_product(x, v, u, n_learngene, n_tailor, width, tokens, interpret)

    return on_each_device(
        local, (x, v, u),
        lambda batch, devices: f"formulation='fused' splits its {x.shape[0]} groups over the mesh axes {batch} "
                               f"({devices} devices); use a per-device batch divisible by model.linear.group_size")
