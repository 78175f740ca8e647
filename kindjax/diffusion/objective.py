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


def distillation_loss(student_out: jax.Array, teacher_out: jax.Array, channels: int) -> jax.Array:
    """Per-sample output distillation ``mean‖ε_student − ε_teacher‖²`` over the first ``channels``
    output channels (the ε prediction; a learned variance is not distilled), ``(B,)``; no gradient
    reaches the teacher."""
    diff = student_out[..., :channels] - jax.lax.stop_gradient(teacher_out[..., :channels])
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def denoising_loss(model: Denoiser, params: Any, diffusion: GaussianDiffusion, x0: jax.Array, xt: jax.Array,
                   t: jax.Array, noise: jax.Array, y: jax.Array, teacher: tuple[Denoiser, Any] | None = None,
                   distill_weight: float = 0.0,
                   rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch mean of the hybrid loss (``mse + vb``) and its per-sample terms.

    ``teacher = (teacher_model, teacher_params)``: the loss adds ``distill_weight·mean_b
    distillation_loss`` against the teacher's output on the same ``x_t, t, y`` (per-sample term
    ``"distill"``), as BK-SDM's output-level knowledge distillation.  ``rngs``: the student's
    stochastic layers in training (``{"dropout": key}``: drop path), none otherwise; the teacher
    runs deterministically.
    """
    out = model.apply({"params": params}, xt, t, y, rngs=rngs or {})
    losses = training_losses(diffusion, out, x0, xt, t, noise, learn_sigma=model.learn_sigma)
    loss = losses["loss"].mean()
    if teacher is not None:
        teacher_model, teacher_params = teacher
        losses = {**losses, "distill": distillation_loss(
            out, teacher_model.apply({"params": teacher_params}, xt, t, y), x0.shape[-1])}
        loss = loss + distill_weight * losses["distill"].mean()
    return loss, losses
