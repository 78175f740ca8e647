"""Image decoding shared by the image sources: ADM's centre crop, skipped-image log, index check.

An image that cannot be decoded gives ``None`` and one warning naming it (:class:`SkipLog`);
a decoded image is :func:`center_crop_arr` of it, uint8 ``(S, S, 3)``.
"""
from __future__ import annotations

import io
import os
import threading
import warnings

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's (and DiT's) preprocessing to uint8 ``(S, S, 3)``, ``S = image_size``.

    While the short side is ≥ 2S, halve both sides (``w ← ⌊w/2⌋``, BOX filter); then
    BICUBIC-resize by ``s = S / short`` to ``(round(s·w), round(s·h))``; then take the
    centre ``S × S`` window, offset ``⌊(h − S)/2⌋, ⌊(w − S)/2⌋``.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top:top + image_size, left:left + image_size]


class SkipLog:
    """Records unreadable images: one warning per image, naming it and the running count."""

    def __init__(self, where: str):
        self.where = where
        self.names: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def record(self, name: str, error: Exception) -> None:
        with self._lock:
            if name in self.names:
                return
            self.names.append(name)
            count = len(self.names)
        warnings.warn(f"skipping unreadable image {name} in {self.where} ({type(error).__name__}: {error}); "
                      f"{count} image(s) skipped so far", RuntimeWarning, stacklevel=3)


def decode_image(data: bytes | str | os.PathLike, image_size: int, name: str,
                 skips: SkipLog) -> np.ndarray | None:
    """:func:`center_crop_arr` of an encoded image (bytes or a path); ``None`` and a logged skip
    when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return center_crop_arr(image, image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        skips.record(name, error)
        return None


def check_index(index: int, length: int) -> int:
    """``index`` as an int in ``0..length-1``, or an IndexError naming the range."""
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"image index {index} out of range 0..{length - 1}")
    return index
