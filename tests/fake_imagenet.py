"""A tiny fake ImageNet manual dir (the ILSVRC 2012 tars TFDS prepares ``imagenet2012`` from)."""
from __future__ import annotations

import importlib.resources
import io
import tarfile
from collections.abc import Mapping

import numpy as np
from PIL import Image


def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A random RGB JPEG of ``height × width``."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def validation_labels() -> list[str]:
    """The synset of ``ILSVRC2012_val_{i:08d}.JPEG`` is line ``i`` (TFDS's ``validation_labels.txt``)."""
    return (importlib.resources.files("tensorflow_datasets") / "datasets" / "imagenet2012"
            / "validation_labels.txt").read_text().split()


def fake_manual_dir(path, rng: np.random.Generator,
                    train: Mapping[str, int] = {"n01440764": 2, "n02085620": 2, "n15075141": 2},
                    val: int = 3) -> dict[str, bytes]:
    """``ILSVRC2012_img_train.tar`` of per-synset tars (``train[s]`` JPEGs of synset ``s``, the i-th
    ``(21 + i) × 34``) and ``ILSVRC2012_img_val.tar`` of ``ILSVRC2012_val_{i:08d}.JPEG``, ``i = 1..val``
    (30 × 18).  TFDS labels the k-th validation file in sorted order with line k of
    :func:`validation_labels`, so file ``i`` gets line ``i``.  Returns ``file name → JPEG bytes``."""
    path.mkdir()
    originals = {}

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for s, count in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_synset:
                for i in range(count):
                    originals[f"{s}_{i}.JPEG"] = data = jpeg(rng, 21 + i, 34)
                    add(per_synset, f"{s}_{i}.JPEG", data)
            add(train_tar, f"{s}.tar", inner.getvalue())
    with tarfile.open(path / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i in range(1, val + 1):
            originals[name := f"ILSVRC2012_val_{i:08d}.JPEG"] = data = jpeg(rng, 30, 18)
            add(val_tar, name, data)
    return originals
