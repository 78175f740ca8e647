"""Data sources.  Every source gives an :class:`ArrayDataset`-like object whose
``batch(step, batch_size, seed)`` is a pure function of its arguments (resumable)."""
from __future__ import annotations

import ml_collections

from kindjax.config import ConfigError

from kindjax.data.digits import load_digits
from kindjax.data.pipeline import ArrayDataset, subset

#: Sources that need data this project cannot download for you, and how to provide it.
NOT_YET_AVAILABLE = {
    "imagenet": "ImageNet-1K (TFDS manual download), encoded to SD-VAE latents",
    "latents": "pre-encoded SD-VAE latent shards",
    "folder": "a folder of class sub-folders of images",
}


def make_dataset(config: ml_collections.ConfigDict) -> ArrayDataset:
    """The training data set named by ``config.data.name`` (class subset applied)."""
    name = config.data.name
    if name == "digits":
        return load_digits(tuple(config.data.classes))
    if name in NOT_YET_AVAILABLE:
        raise ConfigError(
            f"config.data.name={name!r} needs {NOT_YET_AVAILABLE[name]}. That pipeline is not part of "
            f"kindjax yet (tracked as the real-data issue: TFDS ImageNet with a manual download "
            f"directory, image folders, and SD-VAE latent encoding). Until then, train on the embedded "
            f"digits: --config configs/default.py")
    raise ConfigError(f"config.data.name={name!r} is not a known data source; "
                     f"use 'digits' or one of {sorted(NOT_YET_AVAILABLE)}")


__all__ = ["ArrayDataset", "load_digits", "make_dataset", "subset"]
