"""The image-source interface: random-access, deterministic access to labelled images on disk.

Every source (ImageNet through TFDS, a folder of class sub-folders; opened by
:func:`kindjax.data.open_image_source`) gives the :class:`ImageSource` interface. ``image(i)``
is the DiT/ADM preprocessing of the ``i``-th image (:func:`kindjax.data.decode.center_crop_arr`):
uint8 ``(S, S, 3)``; an image that cannot be decoded gives ``None``, a warning naming it, and
counts in ``num_skipped``.

Which classes a source holds, and their labels, follow ``config.data.grouping``,
``config.data.task`` and ``config.data.classes`` (:func:`kindjax.data.class_groups.select_classes`).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageSource(Protocol):
    """Random access to ``len(source)`` labelled images; same index, same image and label."""

    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def label(self, index: int) -> int:
        """The class (``0..num_classes-1``) of image ``index``."""

    def image(self, index: int) -> np.ndarray | None:
        """uint8 ``(S, S, 3)`` (:func:`kindjax.data.decode.center_crop_arr`), or ``None`` if the image
        is unreadable."""

    @property
    def num_skipped(self) -> int:
        """How many distinct images were unreadable so far."""
