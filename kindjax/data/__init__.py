"""Data sources.  Every training source gives an :class:`ArrayDataset`-like object whose
``batch(step, batch_size, seed)`` is a pure function of its arguments (resumable).

Image sources (:func:`open_image_source`: ImageNet through TFDS, folders of class
sub-folders) give random access to preprocessed images, e.g. for latent encoding.
"""
from __future__ import annotations

import ml_collections

from kindjax.config import ConfigError

from kindjax.data.digits import load_digits
from kindjax.data.images import ImageSource, center_crop_arr, open_image_source
from kindjax.data.pipeline import ArrayDataset, subset

DATA_SOURCES = ("digits", "folder", "latents", "imagenet")


def make_dataset(config: ml_collections.ConfigDict):
    """The training data set named by ``config.data.name`` (class selection applied).

    "digits": embedded; "folder": the images of ``data.root`` in memory at
    ``model.image_size`` (pixel space, 3 channels); "latents": pre-encoded SD-VAE latents
    (:func:`kindjax.data.latents.open_latents`). ImageNet is trained on its latents: with
    ``data.latents`` set (the folder ``python -m kindjax.encode`` wrote from this config's
    image source), any source trains on its latents.
    """
    name = config.data.name
    if config.data.latents:
        from kindjax.data.latents import open_latents

        latents = config.copy_and_resolve_references()
        latents.data.root = config.data.latents
        return open_latents(latents)
    if name == "digits":
        return load_digits(tuple(config.data.classes))
    if name == "folder":
        from kindjax.data.folder import load_folder_dataset

        if config.model.in_channels != 3:
            raise ConfigError(f"config.data.name='folder' gives RGB images but model.in_channels="
                              f"{config.model.in_channels}; set model.in_channels=3")
        dataset = load_folder_dataset(config)
        if dataset.num_classes != config.model.num_classes:
            raise ConfigError(f"the folder selection has {dataset.num_classes} classes but model.num_classes="
                              f"{config.model.num_classes}; set model.num_classes={dataset.num_classes}")
        return dataset
    if name == "latents":
        from kindjax.data.latents import open_latents

        return open_latents(config)
    if name == "imagenet":
        raise ConfigError("config.data.name='imagenet' needs ImageNet-1K encoded to SD-VAE latents: it is an "
                          "image source, and ImageNet is trained in latent space. Encode it first with "
                          "`python -m kindjax.encode --config CONFIG --vae VAE_DIR --out LATENT_DIR` "
                          "with this config, then train with --config.data.latents=LATENT_DIR; "
                          "without ImageNet, train on the embedded digits: --config configs/default.py")
    raise ConfigError(f"config.data.name={name!r} is not a known data source; use one of {DATA_SOURCES}")


__all__ = ["ArrayDataset", "ImageSource", "center_crop_arr", "load_digits", "make_dataset",
           "open_image_source", "subset"]
