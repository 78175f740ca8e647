"""Gaussian diffusion (improved DDPM, as DiT uses it) and its samplers."""
from kindjax.diffusion.gaussian import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    respace,
    space_timesteps,
    training_losses,
)
from kindjax.diffusion.objective import Denoiser, denoising_loss, noisy_inputs
from kindjax.diffusion.samplers import (
    DenoiseFn,
    classifier_free_guidance,
    ddim_step,
    ddpm_step,
    sample,
)

__all__ = [
    "DenoiseFn",
    "Denoiser",
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "classifier_free_guidance",
    "ddim_step",
    "ddpm_step",
    "denoising_loss",
    "discretized_gaussian_log_likelihood",
    "noisy_inputs",
    "normal_kl",
    "p_mean_variance",
    "q_posterior",
    "q_sample",
    "respace",
    "sample",
    "space_timesteps",
    "training_losses",
]
