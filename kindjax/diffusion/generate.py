"""Sampling images from a trained DiT: batched, jitted, split over the device mesh."""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from kindjax.diffusion import GaussianDiffusion, sample as run_sampler
from kindjax.diffusion.samplers import initial_noise
from kindjax.io.paths import as_path, write_bytes
from kindjax.models.dit import DiT
from kindjax import sharding


def guidance_channels(sample_config: ml_collections.ConfigDict) -> int | None:
    """``sample.guidance_channels`` for the sampler: ``None`` for "all" (also when a config saved
    before the key existed lacks it), else the number of leading channels guided."""
    value = str(sample_config.get("guidance_channels", "all"))
    return None if value == "all" else int(value)


class SamplingStopped(Exception):
    """A stop request (SIGTERM, Ctrl-C, …) arrived while sampling; what was sampled so far is saved
    (:class:`SamplingProgress`) and the same sampling resumes from it."""


class SamplingProgress:
    """Where a sampling that can be stopped keeps what it drew: every finished batch, and the state
    ``x_t`` of the batch in progress when a stop is requested, under ``directory/<call>/``.  ``call``
    digests what the samples are a function of (``tag``, the key, the labels, the sampler settings,
    the batch size and device count), so a resumed sampling finds exactly its own files.
    ``stop_requested()`` is asked between segments of ``segment`` reverse steps; process 0 writes."""

    def __init__(self, directory: str, tag: str, stop_requested: Callable[[], bool], segment: int = 10):
        self.directory, self.tag, self.stop_requested, self.segment = directory, tag, stop_requested, segment

    def call(self, key: jax.Array, labels: np.ndarray, sample_config: ml_collections.ConfigDict, batch_size: int,
             devices: int) -> epath.Path:
        """The directory of one sampling call."""
        what = json.dumps([self.tag, np.asarray(jax.random.key_data(key)).tolist(), sample_config.to_json(),
                           batch_size, devices, self.segment])
        digest = hashlib.sha256(what.encode() + np.asarray(labels, np.int32).tobytes()).hexdigest()[:20]
        return as_path(self.directory) / digest

    @staticmethod
    def load(where: epath.Path, i: int) -> tuple[np.ndarray, int] | None:
        """``(x, reverse steps done)`` of batch ``i``, or None."""
        path = where / f"batch_{i:06d}.npz"
        if not path.exists():
            return None
        with path.open("rb") as f, np.load(f) as saved:
            return saved["x"], int(saved["done"])

    @staticmethod
    def save(where: epath.Path, i: int, x: np.ndarray, done: int) -> None:
        if jax.process_index() == 0:
            buffer = io.BytesIO()
            np.savez(buffer, x=x, done=np.int64(done))
            write_bytes(where / f"batch_{i:06d}.npz", buffer.getvalue(), atomic=True)


def generate(model: DiT, params: Any, diffusion: GaussianDiffusion, key: jax.Array, labels: np.ndarray,
             sample_config: ml_collections.ConfigDict, batch_size: int = 256,
             mesh: Mesh | None = None, progress: SamplingProgress | None = None) -> np.ndarray:
    """Samples one image per entry of ``labels`` (class ids; ``num_classes`` = unconditional).

    Uses ``sample_config.sampler`` ("ddpm" or "ddim"), ``num_steps``, ``cfg_scale``,
    ``guidance_channels`` ("all", or "3" as the original DiT), ``ddim_eta`` and ``clip_denoised``.  Batches of ``batch_size`` (the last one padded) are split
    over ``mesh``'s batch axes.  Returns float32 NHWC images in [-1, 1].

    With ``progress`` the reverse steps run in segments: finished batches are saved and reused, and a
    stop request between segments saves the batch's state and raises :class:`SamplingStopped`; the
    same call then resumes where it stopped and draws the same images.
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

    def one_batch(p, k, y, start=0, stop=None, x=None):
        return run_sampler(lambda x, t, yy: denoise(p, x, t, yy), diffusion, k, shape, y,
                           method=sample_config.sampler, num_steps=sample_config.num_steps,
                           cfg_scale=sample_config.cfg_scale, null_class=model.num_classes,
                           guidance_channels=guidance_channels(sample_config),
                           learn_sigma=model.learn_sigma, eta=sample_config.ddim_eta,
                           clip_denoised=sample_config.clip_denoised, start=start, stop=stop, x=x)

    rows = sharding.batch_sharding(mesh)
    if progress is None:
        fn = jax.jit(one_batch, in_shardings=(None, sharding.replicated(mesh), rows), out_shardings=rows)
        return sharding.map_batches(lambda y, i: fn(params, jax.random.fold_in(key, i), y), labels, batch_size, mesh)

    replicated = sharding.replicated(mesh)
    segment_fn = jax.jit(one_batch, in_shardings=(None, replicated, rows, replicated, replicated, rows),
                         out_shardings=rows)
    noise_fn = jax.jit(lambda k: initial_noise(k, shape), in_shardings=replicated, out_shardings=rows)
    where = progress.call(key, labels, sample_config, batch_size, devices)
    steps = sample_config.num_steps

    def resumable(y: jax.Array, i: int) -> jax.Array:
        k = jax.random.fold_in(key, i)
        saved = progress.load(where, i)
        x, done = (noise_fn(k), 0) if saved is None else (sharding.put_global(saved[0], rows), saved[1])
        while done < steps:
            if done and progress.stop_requested():
                progress.save(where, i, sharding.to_host(x), done)
                raise SamplingStopped(f"stopped at reverse step {done}/{steps} of batch {i}")
            stop = min(done + progress.segment, steps)
            x = segment_fn(params, k, y, np.int32(done), np.int32(stop), x).block_until_ready()
            done = stop
            if done == steps:
                progress.save(where, i, sharding.to_host(x), done)
        return x

    return sharding.map_batches(resumable, labels, batch_size, mesh)
