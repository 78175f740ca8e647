"""Ancestral DDPM and DDIM sampling with timestep respacing and classifier-free guidance.

``denoise_fn(x, t, y) -> model_output`` is a pure function (the caller closes over the
parameters): ``x`` NHWC float32, ``t`` int32 ``(B,)`` timesteps of the ORIGINAL process,
``y`` int class ids ``(B,)``; it returns ``[ε, v]`` (``2C`` channels) with ``learn_sigma``,
else ``ε`` (``C`` channels). The whole reverse loop is one ``jax.lax.fori_loop``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kindjax.diffusion.gaussian import GaussianDiffusion, extract, p_mean_variance, respace

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(denoise_fn: DenoiseFn, cfg_scale: float, null_class: int,
                             channels: int | None = None) -> DenoiseFn:
    """One call on ``[x, x]`` with labels ``[y, ∅]``: ``ε = ε_∅ + s (ε_y − ε_∅)`` on the first
    ``channels`` output channels (``None``: all ``C`` ε channels); every other channel (the rest of
    ε, the variance channels) is the conditional half's.  ``channels=3`` is the original DiT's
    ``forward_with_cfg`` (``eps, rest = model_out[:, :3], model_out[:, 3:]``), which on 4 latent
    channels leaves the fourth ε channel unguided."""

    def guided(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        batch = x.shape[0]
        k = x.shape[-1] if channels is None else channels
        out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([y, jnp.full_like(y, null_class)]))
        cond, uncond = out[:batch], out[batch:]
        eps = uncond[..., :k] + cfg_scale * (cond[..., :k] - uncond[..., :k])
        return jnp.concatenate([eps, cond[..., k:]], axis=-1)

    return guided


def _nonzero_mask(t: jax.Array, ndim: int) -> jax.Array:
    return (t != 0).astype(jnp.float32).reshape(t.shape + (1,) * (ndim - t.ndim))


def ddpm_step(d: GaussianDiffusion, model_output: jax.Array, x: jax.Array, t: jax.Array, key: jax.Array, *,
              learn_sigma: bool, clip_denoised: bool) -> jax.Array:
    """``x_{t−1} = μ_θ(x_t, t) + 1[t > 0] σ_t z``, ``z ~ N(0, I)``; ``t`` indexes ``d``'s steps."""
    out = p_mean_variance(d, model_output, x, t, learn_sigma, clip_denoised)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return out["mean"] + _nonzero_mask(t, x.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(d: GaussianDiffusion, model_output: jax.Array, x: jax.Array, t: jax.Array, key: jax.Array, *,
              learn_sigma: bool, clip_denoised: bool, eta: float) -> jax.Array:
    """``x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + 1[t > 0] σ_t z`` with
    ``σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})``; ε̂ is re-derived from the
    clipped x̂_0 when ``clip_denoised``."""
    out = p_mean_variance(d, model_output, x, t, learn_sigma, clip_denoised)
    n = x.ndim
    if clip_denoised:
        eps = ((extract(d.sqrt_recip_alphas_cumprod, t, n) * x - out["pred_x0"])
               / extract(d.sqrt_recipm1_alphas_cumprod, t, n))
    else:
        eps = out["eps"]
    abar = extract(d.alphas_cumprod, t, n)
    abar_prev = extract(d.alphas_cumprod_prev, t, n)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    mean = out["pred_x0"] * jnp.sqrt(abar_prev) + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
    noise = jax.random.normal(key, x.shape, x.dtype)
    return mean + _nonzero_mask(t, n) * sigma * noise


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x_T ~ N(0, I)`` of :func:`sample` with ``key``."""
    return jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)


def sample(denoise_fn: DenoiseFn, d: GaussianDiffusion, key: jax.Array, shape: tuple[int, ...], y: jax.Array, *,
           method: str = "ddpm", num_steps: int = 250, cfg_scale: float = 1.0, null_class: int | None = None,
           guidance_channels: int | None = None, learn_sigma: bool = True, clip_denoised: bool = False,
           eta: float = 0.0, start: jax.Array | int = 0, stop: jax.Array | int | None = None,
           x: jax.Array | None = None) -> jax.Array:
    """Draw ``x_0`` of NHWC ``shape`` from ``x_T ~ N(0, I)`` with ``num_steps`` respaced steps of ``d``.

    ``method`` is ``"ddpm"`` (ancestral, learned or fixed-small variance) or ``"ddim"``
    (``eta`` = 0: deterministic). Guidance is on when ``cfg_scale != 1`` (a Python number;
    then ``null_class`` is required), on the first ``guidance_channels`` channels (``None``: all;
    :func:`classifier_free_guidance`). ``method``, ``num_steps``, ``cfg_scale``, ``null_class``,
    ``guidance_channels``, ``learn_sigma`` and ``clip_denoised`` are static; ``key`` and ``y`` may
    be traced.

    ``start``, ``stop``, ``x`` (may be traced): only the reverse steps ``start ≤ i < stop`` (of
    ``0..num_steps−1``), from ``x``, the state after step ``start − 1`` (``x_T`` of
    :func:`initial_noise` for ``start = 0``); step ``i``'s noise is ``fold_in(k, i)``, so a run split
    into such segments draws the same ``x_0`` (a sampling that is stopped and resumed).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    sd = respace(d, num_steps)
    if cfg_scale != 1.0:
        if null_class is None:
            raise ValueError("cfg_scale != 1 needs null_class (the label of the unconditional class)")
        model = classifier_free_guidance(denoise_fn, cfg_scale, null_class, guidance_channels)
    else:
        model = denoise_fn
    timestep_map = jnp.asarray(sd.timestep_map, dtype=jnp.int32)
    steps = sd.num_timesteps
    loop_key = jax.random.split(key)[1]

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((shape[0],), steps - 1 - i, dtype=jnp.int32)
        out = model(x, timestep_map[t], y)
        step_key = jax.random.fold_in(loop_key, i)
        if method == "ddpm":
            return ddpm_step(sd, out, x, t, step_key, learn_sigma=learn_sigma, clip_denoised=clip_denoised)
        return ddim_step(sd, out, x, t, step_key, learn_sigma=learn_sigma, clip_denoised=clip_denoised, eta=eta)

    x0 = initial_noise(key, shape) if x is None else x
    return jax.lax.fori_loop(start, steps if stop is None else stop, body, x0)
