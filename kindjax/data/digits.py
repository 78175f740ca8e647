"""scikit-learn's handwritten digits (1,797 real 8×8 images, classes 0–9), embedded.

``digits.npz`` beside this file holds ``images`` (uint8, (1797, 8, 8), values 0..16)
and ``labels`` (uint8, (1797,)). It was made once, with scikit-learn 1.9.1, by

    d = sklearn.datasets.load_digits()
    np.savez_compressed("digits.npz", images=d.images.astype(np.uint8),
                        labels=d.target.astype(np.uint8))

(the cast is exact: the original values are integers 0..16), so loading needs
neither a download nor scikit-learn.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence

import numpy as np

from kindjax.data.pipeline import ArrayDataset, subset

DIGITS_MAX_VALUE = 16
DIGIT_CLASS_NAMES = tuple(str(d) for d in range(10))


def load_digits(classes: Sequence[int] = ()) -> ArrayDataset:
    """The digits as ``(N, 8, 8, 1)`` float32 with ``x = v / 8 − 1`` (v ∈ 0..16 → [-1, 1]).

    With ``classes`` non-empty, only those digits are kept and digit ``classes[j]``
    gets label ``j`` (see :func:`kindjax.data.pipeline.subset`).
    """
    resource = importlib.resources.files("kindjax") / "data" / "digits.npz"
    with resource.open("rb") as f, np.load(f) as npz:
        raw_images, raw_labels = npz["images"], npz["labels"]
    images = raw_images.astype(np.float32) * (2.0 / DIGITS_MAX_VALUE) - 1.0
    dataset = ArrayDataset(images=images[..., None],
                           labels=raw_labels.astype(np.int32),
                           num_classes=len(DIGIT_CLASS_NAMES),
                           class_names=DIGIT_CLASS_NAMES)
    return subset(dataset, classes) if len(classes) else dataset


class DigitImages:
    """The digits of ``classes`` (all when empty; relabelled ``0..k-1`` as in :func:`load_digits`) as an
    :class:`kindjax.data.images.ImageSource`: uint8 RGB ``(8, 8, 3)``, ``round(127.5·(x + 1))`` of the
    training pixels ``x`` (how the evaluation rounds samples) repeated to three channels. The digits have
    no validation split and their own size: ``data.split`` and ``data.image_size`` do not apply."""

    def __init__(self, classes: Sequence[int] = ()):
        dataset = load_digits(classes)
        pixels = np.clip(np.round((dataset.images + 1.0) * 127.5), 0, 255).astype(np.uint8)
        self._images = np.repeat(pixels, 3, axis=-1)
        self._labels = dataset.labels
        self.num_classes = dataset.num_classes
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self._labels)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def image(self, index: int) -> np.ndarray:
        return self._images[index]

    @property
    def num_skipped(self) -> int:
        return 0


def split_train_test(dataset: ArrayDataset, seed: int = 0,
                     test_fraction: float = 0.2) -> tuple[ArrayDataset, ArrayDataset]:
    """Stratified split: ``round(test_fraction · n_c)`` random examples of class ``c`` go to test.

    Deterministic given ``seed``; returns ``(train, test)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(dataset), dtype=bool)
    for c in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == c)
        n_test = int(round(test_fraction * members.size))
        is_test[rng.permutation(members)[:n_test]] = True

    def take(mask: np.ndarray) -> ArrayDataset:
        return ArrayDataset(images=dataset.images[mask], labels=dataset.labels[mask],
                            num_classes=dataset.num_classes,
                            class_names=dataset.class_names)

    return take(~is_test), take(is_test)
