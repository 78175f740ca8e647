"""Data sources, and the one place that maps ``config.data.name`` to a source.

Training sources (:func:`make_dataset`) implement :class:`TrainingSource`: a step's batch is a
pure function of ``(seed, step)`` (resumable), and each process reads only its own rows.
Image sources (:func:`open_image_source`: ImageNet through TFDS, folders of class sub-folders, the
digits as uint8 RGB, e.g. for a reference batch) implement :class:`ImageSource`: random access to preprocessed images, e.g. for latent encoding.
"""
from __future__ import annotations

import ml_collections

from kindjax.config import ConfigError
from kindjax.data import folder, imagenet, latents
from kindjax.data.class_groups import select_classes
from kindjax.data.decode import center_crop_arr
from kindjax.data.digits import DIGIT_CLASS_NAMES, DigitImages, load_digits
from kindjax.data.images import ImageSource
from kindjax.data.pipeline import ArrayDataset, Batches, TrainingSource, subset

DATA_SOURCES = ("digits", "folder", "latents", "imagenet")
IMAGE_SOURCES = ("imagenet", "folder", "digits")


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names of ``config``'s training classes in label order, read without loading the data: the
    digits' names, a folder's sub-folder names or a latent index's class names, through the class
    selection of ``config.data`` (grouping, task, classes) the training source applies."""
    d = config.data
    if d.latents or d.name == "latents":
        base = latents.read_index(d.latents or d.root)["class_names"]
    elif d.name == "digits":
        base = DIGIT_CLASS_NAMES
    elif d.name == "folder":
        base = folder.class_folders(d.root)
    else:
        raise ConfigError(f"config.data.name={d.name!r} trains on its latents (data.latents), which is empty")
    return select_classes(base, d.grouping, d.task, tuple(d.classes)).class_names


def make_dataset(config: ml_collections.ConfigDict) -> TrainingSource:
    """The training data set named by ``config.data.name`` (class selection applied).

    "digits": embedded; "folder": the images of ``data.root`` in memory at
    ``model.image_size`` (pixel space, 3 channels); "latents": pre-encoded SD-VAE latents
    (:func:`kindjax.data.latents.open_latents`). ImageNet is trained on its latents: with
    ``data.latents`` set (the folder ``python -m kindjax.tools.encode`` wrote from this config's
    image source), any source trains on its latents.
    """
    name = config.data.name
    if config.data.latents:
        encoded = config.copy_and_resolve_references()
        encoded.data.root = config.data.latents
        return latents.open_latents(encoded)
    if name == "digits":
        return load_digits(tuple(config.data.classes))
    if name == "folder":
        if config.model.in_channels != 3:
            raise ConfigError(f"config.data.name='folder' gives RGB images but model.in_channels="
                              f"{config.model.in_channels}; set model.in_channels=3, or, for a latent model, "
                              f"encode the folder once (python -m kindjax.tools.encode --config CONFIG --vae VAE_DIR "
                              f"--out LATENT_DIR) and set data.latents=LATENT_DIR")
        dataset = folder.load_folder_dataset(config)
        if dataset.num_classes != config.model.num_classes:
            raise ConfigError(f"the folder selection has {dataset.num_classes} classes but model.num_classes="
                              f"{config.model.num_classes}; set model.num_classes={dataset.num_classes}")
        return dataset
    if name == "latents":
        return latents.open_latents(config)
    if name == "imagenet":
        raise ConfigError("config.data.name='imagenet' needs ImageNet-1K encoded to SD-VAE latents: it is an "
                          "image source, and ImageNet is trained in latent space. Encode it first with "
                          "`python -m kindjax.tools.encode --config CONFIG --vae VAE_DIR --out LATENT_DIR` "
                          "with this config, then train with --config.data.latents=LATENT_DIR; "
                          "without ImageNet, train on the embedded digits: --config configs/default.py")
    raise ConfigError(f"config.data.name={name!r} is not a known data source; use one of {DATA_SOURCES}")


def open_image_source(config: ml_collections.ConfigDict) -> ImageSource:
    """The image source named by ``config.data.name`` ("imagenet" or "folder" at
    ``config.data.image_size``; "digits" at 8×8), with the class selection of ``config.data``."""
    name = config.data.name
    if name == "digits":
        return DigitImages(tuple(config.data.classes))
    if name == "imagenet":
        return imagenet.open_imagenet(config)
    if name == "folder":
        return folder.open_folder(config)
    raise ConfigError(f"config.data.name={name!r} is not an image source; use one of {IMAGE_SOURCES}")


__all__ = ["DATA_SOURCES", "IMAGE_SOURCES", "ArrayDataset", "Batches", "ImageSource", "TrainingSource",
           "center_crop_arr", "class_names", "load_digits", "make_dataset", "open_image_source", "subset"]
