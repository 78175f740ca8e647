"""ImageNet-1K (ILSVRC 2012) through TFDS, read with random access and no TensorFlow.

Preparing (once) is TFDS's usual manual-download path::

    builder = tfds.builder("imagenet2012", data_dir=DATA_DIR, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))

with ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``MANUAL_DIR``. TFDS
4.9 needs TensorFlow for that step (``pip install tensorflow-cpu``); reading the
prepared array_record files (``builder.as_data_source``) does not.

Labels are TFDS's: index ``k`` is synset ``kindjax.data.class_groups.imagenet_synsets()[k]``.
When a class selection drops classes, the labels of the whole split are read once and
cached in ``DATA_DIR/imagenet2012/<version>/kindjax_labels_<split>_<hash>.npy``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.data.class_groups import ClassSelection, imagenet_synsets, select_classes
from kindjax.data.decode import SkipLog, check_index, decode_image
from kindjax.io.paths import as_path, load_npy, save_npy

TFDS_NAME = "imagenet2012"
_LABEL_CHUNK = 1024


class ImageNetSource:
    """:class:`kindjax.data.images.ImageSource` over records ``{"image": JPEG bytes, "label": int,
    "file_name": bytes}`` (a TFDS data source with image decoding skipped)."""

    def __init__(self, records: Sequence[dict[str, Any]], image_size: int, selection: ClassSelection,
                 where: str, label_cache: str = ""):
        self.records = records
        self.image_size = image_size
        self.num_classes = selection.num_classes
        self.class_names = selection.class_names
        self._base_to_label = selection.base_to_label
        self.skips = SkipLog(where)
        self._index: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if not selection.keeps_all:
            base = self._read_base_labels(label_cache)
            self._index = np.flatnonzero(self._base_to_label[base] >= 0)
            self._labels = self._base_to_label[base[self._index]]

    def _read_base_labels(self, cache: str) -> np.ndarray:
        if cache and as_path(cache).exists():
            labels = load_npy(cache)
            if labels.shape == (len(self.records),):
                return labels
        labels = np.empty(len(self.records), dtype=np.int32)
        for start in range(0, len(self.records), _LABEL_CHUNK):
            stop = min(start + _LABEL_CHUNK, len(self.records))
            labels[start:stop] = [int(self.records[i]["label"]) for i in range(start, stop)]
        if cache:
            try:
                save_npy(cache, labels)
            except OSError as error:
                warnings.warn(f"could not cache the labels at {cache} ({error}); they will be read again "
                              f"next time", RuntimeWarning, stacklevel=3)
        return labels

    def __len__(self) -> int:
        return len(self.records) if self._index is None else int(self._index.size)

    @property
    def num_skipped(self) -> int:
        return len(self.skips)

    def _record_index(self, index: int) -> int:
        index = check_index(index, len(self))
        return index if self._index is None else int(self._index[index])

    def label(self, index: int) -> int:
        if self._labels is not None:
            return int(self._labels[check_index(index, len(self))])
        return int(self._base_to_label[int(self.records[self._record_index(index)]["label"])])

    def image(self, index: int) -> np.ndarray | None:
        record = self.records[self._record_index(index)]
        name = record["file_name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return decode_image(bytes(record["image"]), self.image_size, name, self.skips)


def _missing_preparation_packages() -> list[str]:
    return [package for module, package in (("tensorflow", "tensorflow-cpu"),
                                            ("importlib_resources", "importlib_resources"))
            if importlib.util.find_spec(module) is None]


def prepare_imagenet(data_dir: str, manual_dir: str) -> None:
    """TFDS ``download_and_prepare`` of ``imagenet2012`` in array_record format from the
    ILSVRC 2012 tars in ``manual_dir`` (nothing is downloaded; needs TensorFlow)."""
    import tensorflow_datasets as tfds

    missing = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
               if not (as_path(manual_dir) / f).is_file()]
    if len(missing) == 2:
        raise ConfigError(f"config.data.manual_dir={manual_dir!r} holds neither ILSVRC2012_img_train.tar nor "
                          f"ILSVRC2012_img_val.tar; download them from https://image-net.org/download-images "
                          f"and point data.manual_dir at their folder")
    packages = _missing_preparation_packages()
    if packages:
        raise ConfigError(f"preparing ImageNet with TFDS needs TensorFlow: pip install {' '.join(packages)} "
                          f"(only for this one-time step; reading the prepared data does not need it)")
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def open_imagenet(config: ml_collections.ConfigDict) -> ImageNetSource:
    """ImageNet ``config.data.split`` from the TFDS data_dir ``config.data.root`` (prepared first
    from ``config.data.manual_dir`` if needed), at ``config.data.image_size``."""
    import tensorflow_datasets as tfds

    d = config.data
    if not d.root:
        raise ConfigError("config.data.root is empty; set it to the TFDS data_dir of imagenet2012 "
                          "(where it is, or is to be, prepared)")
    builder = tfds.builder(TFDS_NAME, data_dir=d.root, file_format="array_record")
    if not builder.is_prepared():
        if not d.manual_dir:
            raise ConfigError(f"imagenet2012 is not prepared in config.data.root={d.root!r}; set "
                              f"config.data.manual_dir to the folder holding ILSVRC2012_img_train.tar and "
                              f"ILSVRC2012_img_val.tar to prepare it there (once)")
        prepare_imagenet(d.root, d.manual_dir)
        builder = tfds.builder(TFDS_NAME, data_dir=d.root, file_format="array_record")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ConfigError(f"imagenet2012 in {builder.data_dir} was prepared as {builder.info.file_format.value}, "
                          f"which has no random access; convert it with `tfds convert_format "
                          f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record` or "
                          f"prepare it again in an empty data.root")
    names = tuple(builder.info.features["label"].names)
    if names != imagenet_synsets():
        raise ConfigError(f"the labels of imagenet2012 in {builder.data_dir} are not the 1000 ImageNet-1K "
                          f"synsets in TFDS order; prepare it again with tensorflow-datasets' imagenet2012")
    selection = select_classes(names, d.grouping, d.task, tuple(d.classes))
    try:
        records = builder.as_data_source(d.split, decoders={"image": tfds.decode.SkipDecoding()})
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config.data.split={d.split!r} is not a prepared split of imagenet2012 in "
                          f"{builder.data_dir} ({error}); prepared: {sorted(builder.info.splits)}") from error
    digest = hashlib.sha1(d.split.encode()).hexdigest()[:8]
    cache = os.path.join(builder.data_dir, f"kindjax_labels_{re.sub(r'[^A-Za-z0-9_.-]', '_', d.split)}_{digest}.npy")
    return ImageNetSource(records, d.image_size, selection, where=f"{builder.data_dir} [{d.split}]",
                          label_cache=cache)
