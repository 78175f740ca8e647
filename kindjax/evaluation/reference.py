"""A reference batch of real images for any class subset of an image source, in ADM's format.

The images of ``config.data`` (ImageNet through TFDS or a folder; ``data.split``,
``data.grouping``/``data.task``/``data.classes`` select e.g. one task's classes) with
ADM's centre crop at ``data.image_size``: ``arr_0`` uint8 ``(N, S, S, 3)``, ``arr_1`` the
labels.  ``eval.reference=FILE`` then evaluates a run against it (its Inception statistics are
computed from ``arr_0``).  The command::

    python -m kindjax.evaluation.reference --config CONFIG --out REF.npz [--max_images N] [--config.data.task=T ...]
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import ml_collections
import numpy as np
from absl import flags

from kindjax import cli
from kindjax.data import open_image_source
from kindjax.evaluation.adm import write_sample_batch


def reference_images(config: ml_collections.ConfigDict, max_images: int = 0, seed: int = 0,
                     log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the selected classes: all readable images, or ``max_images`` of them
    drawn without replacement with ``seed`` (kept in source order).  Unreadable images are skipped
    (the source warns and counts them)."""
    source = open_image_source(config)
    indices = np.arange(len(source))
    if 0 < max_images < len(source):
        indices = np.sort(np.random.default_rng(seed).choice(len(source), max_images, replace=False))
    if not len(indices):
        raise ValueError(f"the image source of data.name={config.data.name!r} holds no image of the selected "
                         f"classes; check data.root, data.classes, data.task")
    step = max(1, len(indices) // 10)
    images: list[np.ndarray | None] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(source.image, indices), 1):
            images.append(image)
            if i % step == 0 or i == len(indices):
                log(f"reference batch: {i}/{len(indices)} images read")
    keep = [i for i, image in enumerate(images) if image is not None]
    if not keep:
        raise ValueError(f"none of the {len(indices)} selected images could be read")
    labels = np.asarray([source.label(int(indices[i])) for i in keep], np.int64)
    return np.stack([images[i] for i in keep]), labels


def write_reference_batch(config: ml_collections.ConfigDict, out: str, max_images: int = 0, seed: int = 0,
                          log: Callable[[str], None] = print) -> dict[str, int]:
    """Writes :func:`reference_images` to ``out`` (``.npz``); returns the image and class counts."""
    images, labels = reference_images(config, max_images, seed, log)
    write_sample_batch(out, images, labels)
    summary = {"images": int(images.shape[0]), "classes": int(np.unique(labels).size), "size": int(images.shape[1])}
    log(f"reference batch: {summary['images']} images of {summary['classes']} classes at "
        f"{summary['size']}×{summary['size']} → {out}")
    return summary


def main(argv: list[str]) -> None:
    """Writes the reference batch of ``--config``'s image source and classes to ``--out``."""
    del argv
    f = flags.FLAGS
    write_reference_batch(f.config, f.out, f.max_images, f.config.eval.seed)


if __name__ == "__main__":
    cli.define_config("Config file (configs/*.py): its image source and classes (data.*).")
    flags.DEFINE_string("out", None, "The reference batch to write (ADM .npz: real images arr_0, labels arr_1).")
    flags.DEFINE_integer("max_images", 0, "At most this many images (0: all), drawn with eval.seed.")
    flags.mark_flags_as_required(["config", "out"])
    cli.run(main)
