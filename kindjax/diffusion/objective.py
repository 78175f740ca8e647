"""The denoising objective of a model on a batch: noisy inputs drawn from ``(key_t, key_noise)``,
then the hybrid loss of :func:`kindjax.diffusion.gaussian.training_losses`.  The trainer and
the layer-selection probes share it."""
from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from kindjax.diffusion.gaussian import GaussianDiffusion, q_sample, training_losses


class Denoiser(Protocol):
    """A Linen model called as ``apply({"params": p}, x_t, t, y)`` (the DiT)."""

    learn_sigma: bool

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any: ...


def noisy_inputs(key_t: jax.Array, key_noise: jax.Array, x0: jax.Array,
                 diffusion: GaussianDiffusion) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x_t, t, ε)``: ``t ~ U{0..T-1}`` per sample, ``ε ~ N(0, I)``, ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``."""
    t = jax.random.randint(key_t, (x0.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    return q_sample(diffusion, x0, t, noise), t, noise


def denoising_loss(model: Denoiser, params: Any, diffusion: GaussianDiffusion, x0: jax.Array, xt: jax.Array,
                   t: jax.Array, noise: jax.Array, y: jax.Array,
                   rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch mean of the hybrid loss (``mse + vb``) and its per-sample terms; ``rngs``: the
    model's stochastic layers in training (``{"dropout": key}``: drop path), none otherwise."""
    out = model.apply({"params": params}, xt, t, y, rngs=rngs or {})
    losses = training_losses(diffusion, out, x0, xt, t, noise, learn_sigma=model.learn_sigma)
    return losses["loss"].mean(), losses
