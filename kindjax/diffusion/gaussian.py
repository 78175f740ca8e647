"""Gaussian diffusion as in improved DDPM (Nichol & Dhariwal 2021), the way DiT uses it.

Forward process ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)`` with ``ᾱ_t = ∏_{s≤t} (1 − β_s)``.
The model predicts ε and, with ``learn_sigma``, an interpolation ``v ∈ [−1, 1]`` between
the two bounds of the reverse variance. Images are NHWC; the model output's channels
are on the last axis (``[ε, v]`` when the variance is learned).

Tables are float64 NumPy arrays held by :class:`GaussianDiffusion`; every jnp function
reads them as float32 constants, so close over (or pass as a static argument) the
``GaussianDiffusion`` rather than passing it as a traced argument.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Precomputed float64 tables of a discrete Gaussian diffusion with ``T = len(betas)`` steps.

    ``timestep_map[i]`` is the timestep of the original (un-respaced) process that step
    ``i`` of this process stands for; it is what the model is conditioned on. Equality and
    hashing are by identity, so an instance can be a static argument of ``jax.jit``.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    timestep_map: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray | None = None) -> GaussianDiffusion:
        """All tables from ``β``: ``β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)`` and
        ``μ̃_t = β_t √ᾱ_{t−1}/(1 − ᾱ_t) · x_0 + (1 − ᾱ_{t−1}) √α_t/(1 − ᾱ_t) · x_t``."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        if timestep_map is None:
            timestep_map = np.arange(betas.size)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has shape {timestep_map.shape}, betas {betas.shape}")
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # β̃_0 = 0: its log is replaced by log β̃_1 (the "clipped" log variance); a one-step
        # process has no β̃_1 and uses log β_0.
        post_log_var = np.log(np.append(post_var[1], post_var[1:]) if betas.size > 1 else betas)
        return cls(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=np.sqrt(acp),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
            log_betas=np.log(betas),
            timestep_map=timestep_map,
        )

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> GaussianDiffusion:
        """Linear schedule ``β = linspace(s·β_start, s·β_end, T)`` with ``s = 1000 / T``."""
        scale = 1000.0 / num_timesteps
        return cls.from_betas(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64))

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> GaussianDiffusion:
        """From the ``config.diffusion`` section (``num_timesteps``, ``beta_start``, ``beta_end``)."""
        return cls.linear(int(cfg.num_timesteps), float(cfg.beta_start), float(cfg.beta_end))


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Kept timesteps ``round(i · (T − 1)/(n − 1))``, ``i = 0..n−1`` (improved-DDPM, one section)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    return np.array([round(i * stride) for i in range(num_steps)], dtype=np.int64)


def respace(diffusion: GaussianDiffusion, num_steps: int) -> GaussianDiffusion:
    """Keep ``num_steps`` evenly spaced steps ``t_i``; ``β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}}``, ``ᾱ_{t_{−1}} = 1``.

    The respaced process has ``ᾱ'_i = ᾱ_{t_i}``; its ``timestep_map`` composes with the input's.
    """
    kept = space_timesteps(diffusion.num_timesteps, num_steps)
    acp = diffusion.alphas_cumprod[kept]
    betas = 1.0 - acp / np.append(1.0, acp[:-1])
    return GaussianDiffusion.from_betas(betas, diffusion.timestep_map[kept])


def extract(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """``table[t]`` as float32, shaped ``t.shape + (1,)·(ndim − t.ndim)`` to broadcast over an image."""
    values = jnp.asarray(table, dtype=jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_sample(d: GaussianDiffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``; ``t`` int ``(B,)``."""
    return (extract(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(d.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(d: GaussianDiffusion, x0: jax.Array, xt: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q(x_{t−1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, β̃_t)``: returns (mean, β̃_t, clipped log β̃_t)."""
    n = xt.ndim
    mean = extract(d.posterior_mean_coef1, t, n) * x0 + extract(d.posterior_mean_coef2, t, n) * xt
    variance = jnp.broadcast_to(extract(d.posterior_variance, t, n), xt.shape)
    log_variance = jnp.broadcast_to(extract(d.posterior_log_variance_clipped, t, n), xt.shape)
    return mean, variance, log_variance


def p_mean_variance(d: GaussianDiffusion, model_output: jax.Array, xt: jax.Array, t: jax.Array,
                    learn_sigma: bool, clip_denoised: bool) -> dict[str, jax.Array]:
    """Reverse step ``p(x_{t−1} | x_t) = N(μ̃_t(x̂_0, x_t), σ_t²)`` from the model output.

    ``x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε̂`` (clipped to [−1, 1] if ``clip_denoised``).
    Learned range: ``log σ² = f log β_t + (1 − f) log β̃_t`` with ``f = (v + 1)/2``;
    otherwise fixed-small ``σ² = β̃_t``. Returns mean, variance, log_variance, pred_x0 and
    eps (the model's ε̂), all shaped like ``xt``.
    """
    channels = xt.shape[-1]
    n = xt.ndim
    if learn_sigma:
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(f"learn_sigma needs {2 * channels} output channels, got {model_output.shape[-1]}")
        eps, v = model_output[..., :channels], model_output[..., channels:]
        frac = (v + 1.0) / 2.0
        log_variance = (frac * extract(d.log_betas, t, n)
                        + (1.0 - frac) * extract(d.posterior_log_variance_clipped, t, n))
        variance = jnp.exp(log_variance)
    else:
        if model_output.shape[-1] != channels:
            raise ValueError(f"expected {channels} output channels, got {model_output.shape[-1]}")
        eps = model_output
        variance = jnp.broadcast_to(extract(d.posterior_variance, t, n), xt.shape)
        log_variance = jnp.broadcast_to(extract(d.posterior_log_variance_clipped, t, n), xt.shape)
    pred_x0 = extract(d.sqrt_recip_alphas_cumprod, t, n) * xt - extract(d.sqrt_recipm1_alphas_cumprod, t, n) * eps
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior(d, pred_x0, xt, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise ``KL(N(μ1, e^{l1}) ‖ N(μ2, e^{l2})) = ½(−1 + l2 − l1 + e^{l1−l2} + (μ1 − μ2)² e^{−l2})``."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """``Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³)))``."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """``log ∫_{x−1/255}^{x+1/255} N(z; μ, σ²) dz`` for 8-bit data in [−1, 1], elementwise.

    The bins at the ends are open (``x < −0.999``: ``(−∞, x + 1/255]``; ``x > 0.999``:
    ``[x − 1/255, ∞)``); probabilities are floored at 1e−12.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_losses(d: GaussianDiffusion, model_output: jax.Array, x0: jax.Array, xt: jax.Array,
                    t: jax.Array, noise: jax.Array, learn_sigma: bool) -> dict[str, jax.Array]:
    """Hybrid loss per sample, each ``(B,)``: ``loss = mse + vb``.

    ``mse = mean((ε − ε̂)²)``. With ``learn_sigma``, ``vb`` is ``KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t))``
    for ``t > 0`` and ``−log p(x_0|x_1)`` (discretized decoder) for ``t = 0``, averaged over
    dimensions and in bits, with ε̂ stop-gradient'ed so only ``v`` learns from it; without
    ``learn_sigma``, ``vb = 0``.
    """
    channels = xt.shape[-1]
    eps = model_output[..., :channels]
    mse = _mean_flat(jnp.square(noise - eps))
    if not learn_sigma:
        vb = jnp.zeros_like(mse)
        return dict(loss=mse, mse=mse, vb=vb)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), model_output[..., channels:]], axis=-1)
    out = p_mean_variance(d, frozen, xt, t, learn_sigma=True, clip_denoised=False)
    true_mean, _, true_log_var = q_posterior(d, x0, xt, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    return dict(loss=mse + vb, mse=mse, vb=vb)
