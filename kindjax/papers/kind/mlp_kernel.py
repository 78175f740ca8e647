"""A DiT block's MLP half with grouped KIND matrices as four Pallas TPU kernels: ``h`` stays on chip, and
the LayerNorm-modulate, GELU and gated residual around the two products are computed in the kernels.

For one sample ``j`` of a group (its ``T`` tokens ``x``, its adaLN rows ``β, γ, α``) and the group's column
blocks (:func:`kindjax.papers.kind.layer.group_columns`: ``V₁ (d × K)``, ``U₁ (K × F)``, ``V₂ (F × K)``,
``U₂ (K × d)``, σ and the bias folded into ``U``; ``mask_j`` as in :mod:`kindjax.papers.kind.kernel`):

    forward   m = LN(x)·(1 + γ) + β,   z = mask_j(m·V₁)·U₁,   a = gelu(z),
              o = mask_j(a·V₂)·U₂,     out = x + α ⊙ o
    backward  dα = Σ_t dout ⊙ o,       do = α ⊙ dout,  dh₂ = mask_j(do·U₂ᵀ),  dU₂ += h₂ᵀ·do,  dV₂ += aᵀ·dh₂,
              dz = (dh₂·V₂ᵀ) ⊙ gelu'(z),  dh₁ = mask_j(dz·U₁ᵀ),  dU₁ += h₁ᵀ·dz,  dV₁ += mᵀ·dh₁,
              dm = dh₁·V₁ᵀ,  dβ = Σ_t dm,  dγ = Σ_t dm ⊙ LN(x),  dx = dout + LN'(x)ᵀ·(dm ⊙ (1 + γ))

Per block the kernels read and write ``x`` (``d`` wide) and ``z`` (``F`` wide) only: forward
``x, z | z, x, out``, backward ``dout, z, dz | dz, x, dout, dx``; ``h₁``, ``h₂``, ``m`` and ``a`` are
recomputed on chip.  Off a TPU the kernels run in Pallas's interpret mode (tests).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kindjax.papers.kind.kernel import VMEM_LIMIT_BYTES, accumulator, column_block, sample_mask, sample_rows

_GELU_C = 0.7978845608028654    # √(2/π)


def _layer_norm(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(LN(x), 1/√(var + eps))`` over the last axis, no scale or bias."""
    centred = x - x.mean(-1, keepdims=True)
    inv = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    return centred * inv, inv


def _gelu(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gelu(z), gelu'(z))``, tanh approximation (``jax.nn.gelu(approximate=True)``)."""
    inner = _GELU_C * (z + 0.044715 * z ** 3)
    t = jnp.tanh(inner)
    grad = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)
    return 0.5 * z * (1 + t), grad


def _dot(a, b, acc):
    return jnp.dot(a, b, preferred_element_type=acc)


def _dot_t(a, b, acc):      # a · bᵀ
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def _t_dot(a, b, acc):      # aᵀ · b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def _modulated(x_ref, shift_ref, scale_ref, eps, acc):
    ln, inv = _layer_norm(x_ref[...].astype(acc), eps)
    return ln, inv, ln * (1 + scale_ref[...].astype(acc)) + shift_ref[...].astype(acc)


def _in_forward(x_ref, shift_ref, scale_ref, v_ref, u_ref, z_ref, *, eps, widths):
    acc = accumulator(x_ref.dtype)
    _, _, m = _modulated(x_ref, shift_ref, scale_ref, eps, acc)
    h = sample_mask(_dot(m.astype(v_ref.dtype), v_ref[...], acc), pl.program_id(1), *widths, 1.0)
    z_ref[...] = _dot(h.astype(u_ref.dtype), u_ref[...], acc).astype(z_ref.dtype)


def _out_forward(z_ref, x_ref, gate_ref, v_ref, u_ref, out_ref, *, widths):
    acc = accumulator(z_ref.dtype)
    a, _ = _gelu(z_ref[...].astype(acc))
    h = sample_mask(_dot(a.astype(v_ref.dtype), v_ref[...], acc), pl.program_id(1), *widths, 1.0)
    o = _dot(h.astype(u_ref.dtype), u_ref[...], acc)
    out_ref[...] = (x_ref[...].astype(acc) + gate_ref[...].astype(acc) * o).astype(out_ref.dtype)


def _zero_at_first_sample(*refs):
    @pl.when(pl.program_id(1) == 0)
    def _():
        for ref in refs:
            ref[...] = jnp.zeros_like(ref)


def _out_backward(dout_ref, z_ref, gate_ref, v_ref, u_ref, dz_ref, dgate_ref, dv_ref, du_ref, *, widths):
    _zero_at_first_sample(dv_ref, du_ref)
    sample, acc = pl.program_id(1), accumulator(z_ref.dtype)
    a, gelu_grad = _gelu(z_ref[...].astype(acc))
    a = a.astype(v_ref.dtype)
    h = sample_mask(_dot(a, v_ref[...], acc), sample, *widths, 1.0).astype(u_ref.dtype)
    dout = dout_ref[...].astype(acc)
    dgate_ref[...] = jnp.sum(dout * _dot(h, u_ref[...], acc), axis=0, keepdims=True).astype(dgate_ref.dtype)
    do = (gate_ref[...].astype(acc) * dout).astype(u_ref.dtype)
    dh = sample_mask(_dot_t(do, u_ref[...], acc), sample, *widths, 0.0).astype(v_ref.dtype)
    du_ref[...] += _t_dot(h, do, acc)
    dv_ref[...] += _t_dot(a, dh, acc)
    dz_ref[...] = (_dot_t(dh, v_ref[...], acc) * gelu_grad).astype(dz_ref.dtype)


def _in_backward(dz_ref, x_ref, shift_ref, scale_ref, v_ref, u_ref, dres_ref,
                 dx_ref, dshift_ref, dscale_ref, dv_ref, du_ref, *, eps, widths):
    _zero_at_first_sample(dv_ref, du_ref)
    sample, acc = pl.program_id(1), accumulator(x_ref.dtype)
    ln, inv, m = _modulated(x_ref, shift_ref, scale_ref, eps, acc)
    m = m.astype(v_ref.dtype)
    h = sample_mask(_dot(m, v_ref[...], acc), sample, *widths, 1.0).astype(u_ref.dtype)
    dz = dz_ref[...].astype(u_ref.dtype)
    dh = sample_mask(_dot_t(dz, u_ref[...], acc), sample, *widths, 0.0).astype(v_ref.dtype)
    du_ref[...] += _t_dot(h, dz, acc)
    dv_ref[...] += _t_dot(m, dh, acc)
    dm = _dot_t(dh, v_ref[...], acc)
    dshift_ref[...] = jnp.sum(dm, axis=0, keepdims=True).astype(dshift_ref.dtype)
    dscale_ref[...] = jnp.sum(dm * ln, axis=0, keepdims=True).astype(dscale_ref.dtype)
    dln = dm * (1 + scale_ref[...].astype(acc))
    dx = inv * (dln - dln.mean(-1, keepdims=True) - ln * (dln * ln).mean(-1, keepdims=True))
    dx_ref[...] = (dres_ref[...].astype(acc) + dx).astype(dx_ref.dtype)


def _sample_row(group: int, d: int) -> pl.BlockSpec:
    """Sample ``j``'s row of a ``(B, 1, d)`` array (its adaLN vector)."""
    return pl.BlockSpec((None, 1, d), lambda g, j: (g * group + j, 0, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, semantics, interpret, flops, transcendentals, *args):
    """The kernel over ``grid`` with its cost (``flops``, ``transcendentals``, and the bytes of its operands and
    results) for XLA's cost analysis."""
    written = sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in jax.tree.leaves(out_shape))
    cost = pl.CostEstimate(flops=flops, transcendentals=transcendentals,
                           bytes_accessed=sum(a.size * a.dtype.itemsize for a in args) + written)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def grouped_mlp(x: jax.Array, shift: jax.Array, scale: jax.Array, gate: jax.Array, v_in: jax.Array,
                u_in: jax.Array, v_out: jax.Array, u_out: jax.Array, widths_in: tuple[int, int, int],
                widths_out: tuple[int, int, int], tokens: int, eps: float, interpret: bool) -> jax.Array:
    """``out`` (``(groups, G·T, d)``) of the module docstring: ``x`` ``(groups, G·T, d)``, each sample's ``T``
    tokens in turn; ``shift``, ``scale``, ``gate`` ``(B, 1, d)``; the column blocks ``(groups, ·, ·)``;
    ``widths_*``: ``(N_G, N_T, width)`` of :func:`~kindjax.papers.kind.kernel.sample_mask`."""
    return _forward(x, shift, scale, gate, v_in, u_in, v_out, u_out, widths_in, widths_out, tokens, eps,
                    interpret)[0]


def _grid(x, tokens):
    groups, rows, _ = x.shape
    return groups, rows // tokens


def _forward(x, shift, scale, gate, v_in, u_in, v_out, u_out, widths_in, widths_out, tokens, eps, interpret):
    (groups, group), d = _grid(x, tokens), x.shape[-1]
    (k_in, f), k_out = u_in.shape[1:], u_out.shape[1]
    parallel, rows, vector = ("parallel", "parallel"), groups * group * tokens, _sample_row(group, d)
    z = _call(functools.partial(_in_forward, eps=eps, widths=widths_in), (groups, group),
              [sample_rows(tokens, d), vector, vector, column_block(d, k_in), column_block(k_in, f)],
              sample_rows(tokens, f), jax.ShapeDtypeStruct(x.shape[:-1] + (f,), x.dtype), parallel, interpret,
              2 * rows * k_in * (d + f), rows, x, shift, scale, v_in, u_in)
    out = _call(functools.partial(_out_forward, widths=widths_out), (groups, group),
                [sample_rows(tokens, f), sample_rows(tokens, d), vector, column_block(f, k_out),
                 column_block(k_out, d)],
                sample_rows(tokens, d), jax.ShapeDtypeStruct(x.shape, x.dtype), parallel, interpret,
                2 * rows * k_out * (f + d), rows * f, z, x, gate, v_out, u_out)
    return out, z


def _forward_rule(x, shift, scale, gate, v_in, u_in, v_out, u_out, widths_in, widths_out, tokens, eps, interpret):
    out, z = _forward(x, shift, scale, gate, v_in, u_in, v_out, u_out, widths_in, widths_out, tokens, eps, interpret)
    return out, (x, shift, scale, gate, v_in, u_in, v_out, u_out, z)


def _backward_rule(widths_in, widths_out, tokens, eps, interpret, residuals, dout):
    x, shift, scale, gate, v_in, u_in, v_out, u_out, z = residuals
    (groups, group), d, f = _grid(x, tokens), x.shape[-1], z.shape[-1]
    k_in, k_out = u_in.shape[1], u_out.shape[1]
    acc, rows, vector = accumulator(x.dtype), groups * group * tokens, _sample_row(group, d)
    semantics = ("parallel", "arbitrary")

    def shaped(a, dtype=acc):
        return jax.ShapeDtypeStruct(a.shape, dtype)

    dz, dgate, dv_out, du_out = _call(
        functools.partial(_out_backward, widths=widths_out), (groups, group),
        [sample_rows(tokens, d), sample_rows(tokens, f), vector, column_block(f, k_out), column_block(k_out, d)],
        (sample_rows(tokens, f), vector, column_block(f, k_out), column_block(k_out, d)),
        (shaped(z, z.dtype), shaped(gate), shaped(v_out), shaped(u_out)), semantics, interpret,
        2 * rows * k_out * (3 * f + 3 * d), rows * f, dout, z, gate, v_out, u_out)
    dx, dshift, dscale, dv_in, du_in = _call(
        functools.partial(_in_backward, eps=eps, widths=widths_in), (groups, group),
        [sample_rows(tokens, f), sample_rows(tokens, d), vector, vector, column_block(d, k_in), column_block(k_in, f),
         sample_rows(tokens, d)],
        (sample_rows(tokens, d), vector, vector, column_block(d, k_in), column_block(k_in, f)),
        (shaped(x, x.dtype), shaped(shift), shaped(scale), shaped(v_in), shaped(u_in)), semantics, interpret,
        2 * rows * k_in * (3 * d + 2 * f), rows, dz, x, shift, scale, v_in, u_in, dout)
    grads = (dx, dshift, dscale, dgate, dv_in, du_in, dv_out, du_out)
    return tuple(g.astype(a.dtype) for g, a in zip(grads, (x, shift, scale, gate, v_in, u_in, v_out, u_out)))


grouped_mlp.defvjp(_forward_rule, _backward_rule)
