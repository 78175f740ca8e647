"""In-memory image data sets with a deterministic, resumable batching rule.

The batch of a training step is a pure function of ``(seed, step)``: the stream of
examples is the concatenation of per-epoch permutations

    stream = perm(seed, 0) ++ perm(seed, 1) ++ …
    perm(seed, e) = np.random.default_rng((seed, e)).permutation(N)

and step ``s`` takes ``stream[s·B : (s+1)·B]``. With ``random_flip``, row ``b`` of the
step's batch is mirrored left–right when ``u_b < 1/2``, ``u = default_rng((seed, s, FLIP_STREAM)).random(B)``.
A run's data position is therefore just its step: resuming at step ``s`` yields the same
batches as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

#: Third seed word of the flip draws, so they never share a stream with the permutations.
FLIP_STREAM = 1


def stream_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """``stream[step·B : (step+1)·B]`` of the stream of ``n`` examples (see module docstring):
    ``stream = perm(seed, 0) ++ perm(seed, 1) ++ …``, ``perm(seed, e) = default_rng((seed, e)).permutation(n)``."""
    if step < 0 or batch_size <= 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got {step}, {batch_size}")
    if n == 0:
        raise ValueError("cannot draw batches from an empty data set")
    start = step * batch_size
    stop = start + batch_size
    first_epoch, last_epoch = start // n, (stop - 1) // n
    stream = np.concatenate([np.random.default_rng((seed, epoch)).permutation(n)
                             for epoch in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * n
    return stream[offset:offset + batch_size]


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images (float32 NHWC in [-1, 1]) with int32 labels in ``0..num_classes-1``;
    ``random_flip`` mirrors each batch row with probability 1/2 (see module docstring)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be NHWC, got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match "
                             f"{self.images.shape[0]} images")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for "
                             f"{self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Example indices of the global batch of ``step`` (:func:`stream_indices`)."""
        return stream_indices(len(self), step, batch_size, seed)

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """The batch of ``step``: ``dict(image=(B,H,W,C) float32, label=(B,) int32)``."""
        idx = self.indices(step, batch_size, seed)
        images = self.images[idx]
        if self.random_flip:
            flip = np.random.default_rng((seed, step, FLIP_STREAM)).random(batch_size) < 0.5
            images[flip] = images[flip, :, ::-1]
        return {"image": images, "label": self.labels[idx]}


def subset(dataset: ArrayDataset, classes: Sequence[int]) -> ArrayDataset:
    """Keep only ``classes``; class ``classes[j]`` is relabelled ``j`` (names follow)."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("subset needs at least one class")
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} out of range 0..{dataset.num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"repeated class ids in {classes}")
    relabel = np.full(dataset.num_classes, -1, dtype=np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    keep = relabel[dataset.labels] >= 0
    return ArrayDataset(
        images=dataset.images[keep],
        labels=relabel[dataset.labels[keep]],
        num_classes=len(classes),
        class_names=tuple(dataset.class_names[c] for c in classes),
        random_flip=dataset.random_flip,
    )
