"""A folder of class sub-folders, ``root/<class_name>/<image>``, as an image source.

Classes are the sub-folder names, sorted; images are the files with an image extension
(:data:`IMAGE_EXTENSIONS`, any case) directly inside a class folder, sorted by name.
:func:`load_folder_dataset` decodes all of them into an in-memory :class:`ArrayDataset`
for pixel-space training.
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings

import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.data.class_groups import ClassSelection, select_classes
from kindjax.data.decode import SkipLog, check_index, decode_image
from kindjax.data.pipeline import ArrayDataset
from kindjax.io.paths import as_path, is_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class FolderSource:
    """:class:`kindjax.data.images.ImageSource` over ``root/<class_name>/<image>``."""

    def __init__(self, root: str, image_size: int, selection: ClassSelection,
                 folder_names: tuple[str, ...]):
        self.root = root
        self.image_size = image_size
        self.num_classes = selection.num_classes
        self.class_names = selection.class_names
        paths, labels = [], []
        for base, folder in enumerate(folder_names):
            if selection.base_to_label[base] < 0:
                continue
            directory = os.path.join(root, folder)
            files = sorted(f.name for f in as_path(directory).iterdir()
                           if f.name.lower().endswith(IMAGE_EXTENSIONS) and f.is_file())
            if not files:
                raise ConfigError(f"class folder {directory} holds no images (extensions {IMAGE_EXTENSIONS}); "
                                  f"add images or remove the folder")
            paths += [os.path.join(directory, f) for f in files]
            labels += [int(selection.base_to_label[base])] * len(files)
        self.paths = tuple(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        empty = sorted(set(range(self.num_classes)) - set(self.labels.tolist()))
        if empty:
            raise ConfigError(f"no class folder in {root} holds images of the selected classes "
                              f"{[self.class_names[c] for c in empty[:5]]} (of {len(empty)}); "
                              f"add them or change config.data.grouping/task/classes")
        self.skips = SkipLog(root)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_skipped(self) -> int:
        return len(self.skips)

    def label(self, index: int) -> int:
        return int(self.labels[check_index(index, len(self))])

    def image(self, index: int) -> np.ndarray | None:
        path = self.paths[check_index(index, len(self))]
        try:
            data = as_path(path).read_bytes() if is_uri(path) else path
        except OSError as error:
            self.skips.record(path, error)
            return None
        return decode_image(data, self.image_size, path, self.skips)


def class_folders(root: str) -> tuple[str, ...]:
    """The sorted class sub-folder names of ``root``; a ConfigError if there are none."""
    if not root or not as_path(root).is_dir():
        raise ConfigError(f"config.data.root={root!r} is not a directory; set it to a folder of class "
                          f"sub-folders (root/<class_name>/<image>)")
    folders = tuple(sorted(d.name for d in as_path(root).iterdir() if d.is_dir()))
    if not folders:
        raise ConfigError(f"config.data.root={root!r} has no class sub-folders; put each class's images "
                          f"in root/<class_name>/")
    return folders


def open_folder(config: ml_collections.ConfigDict, image_size: int | None = None) -> FolderSource:
    """The folder source of ``config.data`` (root, grouping, task, classes) at ``image_size``
    (default ``config.data.image_size``)."""
    d = config.data
    folders = class_folders(d.root)
    selection = select_classes(folders, d.grouping, d.task, tuple(d.classes))
    return FolderSource(d.root, d.image_size if image_size is None else image_size, selection, folders)


def load_folder_dataset(config: ml_collections.ConfigDict) -> ArrayDataset:
    """All readable images of the folder source at ``config.model.image_size`` in memory:
    float32 ``x = v / 127.5 − 1`` (v ∈ 0..255 → [-1, 1]), 3 channels, random flips per
    ``config.data.random_flip``. Unreadable images are skipped (warned and counted)."""
    source = open_folder(config, image_size=config.model.image_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(source.image, range(len(source))))
    keep = [i for i, image in enumerate(images) if image is not None]
    if source.num_skipped:
        warnings.warn(f"{source.num_skipped} of {len(source)} images in {source.root} were unreadable and "
                      f"skipped: {source.skips.names[:5]}", RuntimeWarning, stacklevel=2)
    readable = set(source.labels[keep].tolist())
    empty = [source.class_names[c] for c in range(source.num_classes) if c not in readable]
    if empty:
        raise ConfigError(f"{len(empty)} class(es) in {source.root} have no readable image: {empty[:5]} (unreadable: "
                          f"{source.skips.names[:3]}); replace the images, remove the folders, or leave the classes "
                          f"out with config.data.classes")
    pixels = np.stack([images[i] for i in keep]).astype(np.float32) * (2.0 / 255.0) - 1.0
    return ArrayDataset(images=pixels, labels=source.labels[keep], num_classes=source.num_classes,
                        class_names=source.class_names, random_flip=bool(config.data.random_flip))
