"""DiT (Peebles & Xie 2023) with adaLN-Zero / adaLN-Gaussian blocks, in Flax Linen.

Images are NHWC.  The six main matrices of every block come from an injected
linear factory (``kindjax.layers``), so the papers' decomposed layers and the PEFT baselines reuse
this one backbone; parameters a variant shares across blocks (shared bases ``U``, ``V``)
are built once at the top level (``kindjax.layers.SharedParams``) and lent to every
block.  ``model.apply(params, x, t, y)`` returns ``(B, H, W, C_out)``
with ``C_out = 2·C`` when the variance is learned (ε first, then the variance
interpolation ``v``).

Mixed precision (``model.dtype="bfloat16"``): parameters stay f32 and are cast where they
are used, so every matmul takes bf16 operands (bf16 outputs; GPUs and TPUs accumulate bf16
matmuls in f32), the residual stream and the adaLN shift/scale/gate are bf16, while the
LayerNorm statistics, the softmax of attention and the output (and so the loss) are f32.

Memory and compile time: ``model.remat`` recomputes each block in the backward pass
(:func:`remat_policy`); ``model.scan_blocks`` runs the blocks as one ``lax.scan`` over their
stacked parameters.  The parameter tree is the same either way (``block_<i>/…``): the scan
stacks the per-block leaves inside the step, so checkpoints, path rules, slicing and
conversions never see a stacked layout.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kindjax.archs import resolve_dims
from kindjax.layers import (LinearFactory, applies_residual, counted_twin, fused_mlp, fused_roles, gated_sum,
                            make_linear_factory, shared_params)
from kindjax.models.attention import dot_product_attention


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, ``(grid², dim)``.

    Half the channels encode the row index, half the column index, each as
    ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(-k/(dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # DiT's order: the first half from the column (w) coordinate, the second from the row (h).
    return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features ``[cos(t·ω_k), sin(t·ω_k)]``, ``ω_k = P^(-k/(dim/2 - shift))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """t → MLP(sinusoid(t)) (two dense layers with SiLU, N(0, 0.02²) init)."""

    hidden_size: int
    freq_dim: int = 256
    freq_shift: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(t, self.freq_dim, self.freq_shift).astype(self.dtype)
        h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="linear_1")(h)
        return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="linear_2")(nn.silu(h))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class used for guidance."""

    num_classes: int
    hidden_size: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(0.02),
                           (self.num_classes + 1, self.hidden_size))
        return jnp.take(table, y, axis=0)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: ``x·(1 + scale) + shift`` broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def gated_residual(layer: nn.Module, x: jax.Array, y: jax.Array, residual: jax.Array,
                   gate: jax.Array) -> jax.Array:
    """``residual + gate ⊙ layer(x, y)`` with one ``gate`` row per sample (``(B, d)``).  A layer that
    :func:`~kindjax.layers.base.applies_residual` takes ``residual=`` and ``gate=`` and computes the sum
    itself, in its own layout (XLA:TPU fuses the sum into a product's output only when no reshape stands
    between them)."""
    if applies_residual(layer):
        return layer(x, y, residual=residual, gate=gate)
    return gated_sum(residual, gate, layer(x, y))


def adaln_kernel_init(adaln_init: str, stds: Sequence[float], hidden: int):
    """Initialiser of the block modulation matrix (6 chunks: β, γ, α for attention then MLP).

    ``zero``: adaLN-Zero.  ``gaussian``: N(0, std²) with one std for all chunks, or
    three stds for (α, γ, β) as in adaLN-Gaussian-v2.
    """
    if adaln_init == "zero":
        return nn.initializers.zeros
    if adaln_init != "gaussian":
        raise ValueError(f"model.adaln_init={adaln_init!r}: use 'zero' or 'gaussian'")
    if len(stds) == 1:
        alpha = gamma = beta = stds[0]
    elif len(stds) == 3:
        alpha, gamma, beta = stds
    else:
        raise ValueError(f"model.adaln_std needs 1 or 3 values (α, γ, β), got {list(stds)}")
    chunk_std = jnp.repeat(jnp.asarray([beta, gamma, alpha] * 2, jnp.float32), hidden)

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.normal(key, shape, dtype) * chunk_std[None, :]).astype(dtype)

    return init


def remat_policy(remat: str) -> Callable | None:
    """``model.remat`` → the ``jax.checkpoint`` policy of a block: ``block`` keeps only the block's
    input (``nothing_saveable``: the whole block is recomputed in the backward pass),
    ``dots_saveable`` keeps every matmul output and recomputes the rest; ``none``: no remat."""
    policies = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                "dots_saveable": jax.checkpoint_policies.dots_saveable}
    if remat not in policies:
        raise ValueError(f"model.remat={remat!r}: use one of {list(policies)}")
    return policies[remat]


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output matrices (or one fused ``qkv``
    matrix ``d → 3d`` split into q, k, v, when the linear variant declares it); ``attention``
    is the implementation of ``softmax(q·kᵀ/√h)·v`` (:mod:`kindjax.models.attention`).

    With ``scales`` (DiffFit's Alg. 3): ``[q | k | v] ← γ_qkv ⊙ [q | k | v]`` and ``out ← γ_proj ⊙ out``
    with learned ``gamma_qkv`` ``(3d,)``, ``gamma_proj`` ``(d,)`` initialised to 1."""

    hidden_size: int
    num_heads: int
    linear: LinearFactory
    attention: str = "xla"
    scales: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, shared: Any = None, residual: jax.Array | None = None,
                 gate: jax.Array | None = None) -> jax.Array:
        """The attention's output, or ``residual + gate ⊙ output`` when ``residual`` and ``gate`` are given
        (:func:`gated_residual`)."""
        b, n, d = x.shape
        head_dim = d // self.num_heads

        def heads(h):
            return h.reshape(b, n, self.num_heads, head_dim)

        if "qkv" in fused_roles(self.linear):
            qkv = jnp.split(self.linear("qkv", 3 * d, "qkv", shared=shared)(x, y), 3, axis=-1)
        else:
            qkv = [self.linear(role, d, role, shared=shared)(x, y) for role in ("q", "k", "v")]
        if self.scales:
            gamma = jnp.split(self.param("gamma_qkv", nn.initializers.ones, (3 * d,)), 3)
            qkv = [h * g.astype(h.dtype) for h, g in zip(qkv, gamma)]
        q, k, v = (heads(h) for h in qkv)
        out = dot_product_attention(q, k, v, self.attention).reshape(b, n, d)
        attn_out = self.linear("attn_out", d, "attn_out", shared=shared)
        if self.scales:
            out = attn_out(out, y)
            out = out * self.param("gamma_proj", nn.initializers.ones, (d,)).astype(out.dtype)
            return out if residual is None else gated_sum(residual, gate, out)
        if residual is None:
            return attn_out(out, y)
        return gated_residual(attn_out, out, y, residual, gate)


def drop_path(key: jax.Array, branch: jax.Array, rate: float) -> jax.Array:
    """Stochastic depth on a residual branch ``(B, ...)``: ``branch · m_b / (1 − p)`` with one
    ``m_b ~ Bernoulli(1 − p)`` per sample, so ``E[out] = branch``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (branch.shape[0],) + (1,) * (branch.ndim - 1))
    return branch * keep.astype(branch.dtype) / jnp.asarray(1.0 - rate, branch.dtype)


class DiTBlock(nn.Module):
    """``x += α₁·Attn(adaLN(x)); x += α₂·MLP(adaLN(x))`` with (β, γ, α) from the condition;
    ``shared``: the linear variant's parameters shared across blocks (or ``None``).
    The adaLN modulation is a dense layer, or the variant's ``"adaln"`` matrix when it declares one.

    ``drop_key`` (training with ``drop_path > 0`` only): each residual branch is dropped per
    sample (:func:`drop_path`); ``None``: no drop (evaluation, sampling).

    With ``residual_scales`` (DiffFit's Alg. 1): ``x += γ₁ ⊙ α₁·Attn(…); x += γ₂ ⊙ α₂·MLP(…)`` with
    learned per-channel ``gamma_attn``, ``gamma_mlp`` initialised to 1 (no change at init); with
    ``attention_scales``, the attention's ``gamma_qkv``, ``gamma_proj`` (:class:`Attention`).
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    linear: LinearFactory
    adaln_init: str
    adaln_std: Sequence[float]
    norm_eps: float
    mlp_norm_eps: float
    residual_scales: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    drop_path: float = 0.0
    attention_scales: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, y: jax.Array, shared: Any = None,
                 drop_key: jax.Array | None = None) -> jax.Array:
        d = self.hidden_size
        if "adaln" in fused_roles(self.linear):
            mod = self.linear("adaln", 6 * d, "adaln_modulation", shared=shared)(nn.silu(c).astype(self.dtype), y)
        else:
            mod = nn.Dense(6 * d, kernel_init=adaln_kernel_init(self.adaln_init, self.adaln_std, d),
                           bias_init=nn.initializers.zeros, dtype=self.dtype, name="adaln_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        if self.residual_scales:
            gate_msa = gate_msa * self.param("gamma_attn", nn.initializers.ones, (d,)).astype(gate_msa.dtype)
            gate_mlp = gate_mlp * self.param("gamma_mlp", nn.initializers.ones, (d,)).astype(gate_mlp.dtype)
        norm = lambda name, eps: nn.LayerNorm(eps, use_bias=False, use_scale=False, dtype=self.dtype, name=name)
        h = modulate(norm("norm1", self.norm_eps)(x), shift_msa, scale_msa)
        keys = (None, None) if drop_key is None or self.drop_path == 0 else jax.random.split(drop_key)

        def residual(key, branch):
            return branch if key is None else drop_path(key, branch, self.drop_path)

        attn = Attention(d, self.num_heads, self.linear, self.attention, self.attention_scales, name="attn")
        if keys[0] is None:
            x = attn(h, y, shared, residual=x, gate=gate_msa)
        else:
            x = x + residual(keys[0], gate_msa[:, None] * attn(h, y, shared))
        mlp_in = self.linear("mlp_in", int(d * self.mlp_ratio), "mlp_in", shared=shared)
        mlp_out = self.linear("mlp_out", d, "mlp_out", shared=shared)
        fused = fused_mlp(self.linear)
        if fused is not None and keys[1] is None:
            return fused(mlp_in, mlp_out, x, y, shift_mlp, scale_mlp, gate_mlp, self.mlp_norm_eps)
        h = modulate(norm("norm2", self.mlp_norm_eps)(x), shift_mlp, scale_mlp)
        h = nn.gelu(mlp_in(h, y), approximate=True)
        if keys[1] is None:
            return gated_residual(mlp_out, h, y, x, gate_mlp)
        return x + residual(keys[1], gate_mlp[:, None] * mlp_out(h, y))


class FinalLayer(nn.Module):
    """adaLN (zero-initialised) then a zero-initialised projection to patch pixels; with ``output_scale``
    (DiffFit's "final layer" γ) its output is multiplied by a learned ``gamma_out`` ``(p²·C_out,)``
    initialised to 1."""

    patch_size: int
    out_channels: int
    norm_eps: float
    dtype: jnp.dtype = jnp.float32
    output_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = x.shape[-1]
        mod = nn.Dense(2 * d, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                       name="adaln_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        norm = nn.LayerNorm(self.norm_eps, use_bias=False, use_scale=False, dtype=self.dtype, name="norm")
        features = self.patch_size ** 2 * self.out_channels
        out = nn.Dense(features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                       name="linear")(modulate(norm(x), shift, scale))
        if self.output_scale:
            out = out * self.param("gamma_out", nn.initializers.ones, (features,)).astype(out.dtype)
        return out


class DiT(nn.Module):
    """Class-conditional diffusion transformer.

    ``__call__(x, t, y)``: ``x`` noisy images ``(B, H, W, C)``, ``t`` timesteps
    ``(B,)``, ``y`` class ids ``(B,)`` in ``[0, num_classes]`` (the last is the null
    class).  Label dropout for guidance is the trainer's (:func:`drop_labels`), so
    the module is a pure function of its inputs.  ``attention``, ``remat`` and ``scan_blocks``
    change how the blocks run, never the parameters or the values (to rounding).

    DiffFit's learned scales γ (all initialised to 1): ``residual_scales`` (the blocks' two residual
    branches), ``attention_scales`` (q, k, v and the attention projection) in blocks
    ``0 … scale_blocks − 1`` (``0``: every block), ``output_scale`` (the final layer's output).

    ``drop_path`` (stochastic depth, ``model.drop_path``) acts only when the caller passes a
    ``'dropout'`` rng (``apply(..., rngs={"dropout": key})``: the trainer's training step, when
    the rate is > 0); without one, as in sampling and evaluation, the model is deterministic.
    Block ``i`` draws from ``fold_in(key, i)``, in the loop and the scan alike.
    """

    image_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    num_classes: int
    linear: LinearFactory
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    adaln_init: str = "zero"
    adaln_std: Sequence[float] = (1e-3,)
    timestep_freq_shift: float = 1.0
    norm_eps: float = 1e-6
    mlp_norm_eps: float = 1e-6
    residual_scales: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    scan_blocks: bool = False
    drop_path: float = 0.0
    attention_scales: bool = False
    output_scale: bool = False
    scale_blocks: int = 0

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        if h != self.image_size or w != self.image_size or c != self.in_channels:
            raise ValueError(f"DiT expects inputs (B, {self.image_size}, {self.image_size}, "
                             f"{self.in_channels}), got {x.shape}")
        gh, gw = h // p, w // p
        patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        tokens = nn.Dense(self.hidden_size, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                          name="x_embedder")(patches.astype(self.dtype))
        tokens = tokens + sincos_pos_embed_2d(self.hidden_size, gh).astype(self.dtype)[None]
        t_emb = TimestepEmbedder(self.hidden_size, freq_shift=self.timestep_freq_shift, dtype=self.dtype,
                                 name="t_embedder")(t)
        y_emb = LabelEmbedder(self.num_classes, self.hidden_size, name="y_embedder")(y)
        cond = t_emb + y_emb.astype(self.dtype)
        spec = shared_params(self.linear)
        shared = spec.module(name=spec.name)() if spec is not None else None
        scaled = self.scale_blocks or self.depth   # blocks 0..scaled-1 carry the blocks' γ

        def block(i: int) -> functools.partial:
            has = i < scaled
            return functools.partial(
                DiTBlock, self.hidden_size, self.num_heads, self.mlp_ratio, self.linear, self.adaln_init,
                tuple(self.adaln_std), self.norm_eps, self.mlp_norm_eps, self.residual_scales and has, self.dtype,
                self.attention, self.drop_path, self.attention_scales and has)

        dropping = self.drop_path > 0 and self.has_rng("dropout")
        drop_base = self.make_rng("dropout") if dropping else None
        drop_keys = [jax.random.fold_in(drop_base, i) if dropping else None for i in range(self.depth)]
        # The scan reads the blocks' parameters; init (and capturing each block's output) runs the loop.
        if self.scan_blocks and not self.is_initializing() and not self.is_mutable_collection("intermediates"):
            for start, stop in ((0, scaled), (scaled, self.depth)):   # one scan per run of identical blocks
                if start < stop:
                    per_block = [self.variables["params"][f"block_{i}"] for i in range(start, stop)]
                    tokens = scan_blocks(block(start)(parent=None), per_block, tokens, cond, y, shared, self.remat,
                                         jnp.stack(drop_keys[start:stop]) if dropping else None)
        else:
            policy = remat_policy(self.remat)
            for i in range(self.depth):
                layer = block(i) if policy is None else functools.partial(nn.remat(DiTBlock, policy=policy),
                                                                           *block(i).args)
                tokens = layer(name=f"block_{i}")(tokens, cond, y, shared, drop_keys[i])
        out = FinalLayer(p, self.out_channels, self.norm_eps, self.dtype, self.output_scale,
                         name="final_layer")(tokens, cond)
        out = out.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, self.out_channels).astype(jnp.float32)


def stack_blocks(per_block: Sequence[Any]) -> Any:
    """The blocks' parameter trees stacked leaf by leaf along a new leading axis (the scan's)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)


def scan_blocks(block: DiTBlock, per_block: Sequence[Any], tokens: jax.Array, cond: jax.Array, y: jax.Array,
                shared: Any, remat: str = "none", drop_keys: jax.Array | None = None) -> jax.Array:
    """``x_{l+1} = block(θ_l)(x_l, c, y)`` for ``l = 0…L-1`` as one ``lax.scan`` over the stacked
    ``θ_l`` (one compiled block instead of ``L``), each step under ``model.remat``'s policy;
    ``drop_keys`` ``(L,)``: block ``l``'s drop-path key (``None``: no drop path)."""
    def step(x, xs):
        params, key = xs
        return block.apply({"params": params}, x, cond, y, shared, key), None

    policy = remat_policy(remat)
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    out, _ = jax.lax.scan(step, tokens, (stack_blocks(per_block), drop_keys))
    return out


def drop_labels(key: jax.Array, y: jax.Array, prob: float, null_class: int) -> jax.Array:
    """Classifier-free-guidance label dropout: each y → ``null_class`` with probability ``prob``."""
    return jnp.where(jax.random.bernoulli(key, prob, y.shape), null_class, y)


def build_model(config: ml_collections.ConfigDict) -> DiT:
    """The Linen DiT for ``config`` (a full config with a ``model`` field, or the model config)."""
    m = config.model if "model" in config else config
    dims = resolve_dims(m)
    hidden, depth, heads = dims.hidden_size, dims.depth, dims.num_heads
    return DiT(
        image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
        hidden_size=hidden, depth=depth, num_heads=heads, num_classes=m.num_classes,
        linear=make_linear_factory(m), mlp_ratio=m.mlp_ratio,
        learn_sigma=m.learn_sigma, adaln_init=m.adaln_init, adaln_std=tuple(m.adaln_std),
        timestep_freq_shift=m.timestep_freq_shift, norm_eps=m.norm_eps, mlp_norm_eps=m.mlp_norm_eps,
        residual_scales=m.get("residual_scales", False), attention_scales=m.get("attention_scales", False),
        output_scale=m.get("output_scale", False), scale_blocks=m.get("scale_blocks", 0),
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        attention=m.get("attention", "xla"), remat=m.get("remat", "none"), scan_blocks=m.get("scan_blocks", False),
        drop_path=m.get("drop_path", 0.0))


def unrolled(model: DiT) -> DiT:
    """``model`` computing the same function with its blocks in a Python loop, no remat, XLA attention
    and linear layers without kernels (:func:`kindjax.layers.counted_twin`): the form whose every FLOP
    XLA's cost analysis counts (it counts the body of a ``lax.scan`` once, and a Pallas or cuDNN kernel
    traced for the host as opaque or as its interpreter's loop)."""
    return model.clone(scan_blocks=False, remat="none", attention="xla", linear=counted_twin(model.linear))


def _dummy_inputs(model: DiT) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
    i = jax.ShapeDtypeStruct((1,), jnp.int32)
    return x, i, i


def init_params(key: jax.Array, model: DiT) -> Any:
    """Fresh parameters of ``model`` (traced on a one-image dummy batch, with XLA attention: the
    attention has no parameters, and a kernel may not run where the parameters are made, e.g. cuDNN's
    on the CPU host of a pre-flight)."""
    x, t, y = (jnp.zeros(s.shape, s.dtype) for s in _dummy_inputs(model))
    return model.clone(attention="xla").init(key, x, t, y)["params"]


def abstract_params(model: DiT) -> Any:
    """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves; nothing is computed
    (a shape-only trace, which also surfaces a linear variant's own size errors)."""
    return jax.eval_shape(lambda key: init_params(key, model), jax.random.key(0))
