"""Sampling images from a trained DiT: batched, jitted, split over the device mesh."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kindjax.diffusion import GaussianDiffusion, sample as run_sampler
from kindjax.models.dit import DiT
from kindjax import sharding


def guidance_channels(sample_config: ml_collections.ConfigDict) -> int | None:
    """``sample.guidance_channels`` for the sampler: ``None`` for "all" (also when a config saved
    before the key existed lacks it), else the number of leading channels guided."""
    value = str(sample_config.get("guidance_channels", "all"))
    return None if value == "all" else int(value)


def generate(model: DiT, params: Any, diffusion: GaussianDiffusion, key: jax.Array, labels: np.ndarray,
             sample_config: ml_collections.ConfigDict, batch_size: int = 256,
             mesh: Mesh | None = None) -> np.ndarray:
    """Samples one image per entry of ``labels`` (class ids; ``num_classes`` = unconditional).

    Uses ``sample_config.sampler`` ("ddpm" or "ddim"), ``num_steps``, ``cfg_scale``,
    ``guidance_channels`` ("all", or "3" as the original DiT), ``ddim_eta`` and ``clip_denoised``.  Batches of ``batch_size`` (the last one padded) are split
    over ``mesh``'s batch axes.  Returns float32 NHWC images in [-1, 1].
    """
    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() > model.num_classes):
        raise ValueError(f"class ids must lie in [0, {model.num_classes}] ({model.num_classes} is the "
                         f"unconditional class); got {labels.min()}..{labels.max()}")
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    devices = mesh.devices.size
    batch_size = -(-min(batch_size, max(len(labels), 1)) // devices) * devices
    shape = (batch_size, model.image_size, model.image_size, model.in_channels)
    if len(labels) == 0:
        return np.zeros((0,) + shape[1:], np.float32)

    def denoise(p, x, t, y):
        return model.apply({"params": p}, x, t, y)

    def one_batch(p, k, y):
        return run_sampler(lambda x, t, yy: denoise(p, x, t, yy), diffusion, k, shape, y,
                           method=sample_config.sampler, num_steps=sample_config.num_steps,
                           cfg_scale=sample_config.cfg_scale, null_class=model.num_classes,
                           guidance_channels=guidance_channels(sample_config),
                           learn_sigma=model.learn_sigma, eta=sample_config.ddim_eta,
                           clip_denoised=sample_config.clip_denoised)

    rows = sharding.batch_sharding(mesh)
    fn = jax.jit(one_batch, in_shardings=(None, sharding.replicated(mesh), rows), out_shardings=rows)
    return sharding.map_batches(lambda y, i: fn(params, jax.random.fold_in(key, i), y), labels, batch_size, mesh)
