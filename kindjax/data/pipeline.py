"""The training-source interface, its data order, and in-memory image data sets.

Every training data set is a :class:`TrainingSource`.  The batch of a training step is a
pure function of ``(seed, step)``: the stream of examples is the concatenation of
per-epoch permutations

    stream = perm(seed, 0) ++ perm(seed, 1) ++ …
    perm(seed, e) = np.random.default_rng((seed, e)).permutation(N)

and step ``s`` takes ``stream[s·B : (s+1)·B]`` (:func:`stream_indices`).  Process ``p`` of
``P`` gets rows ``[p·B/P, (p+1)·B/P)`` of that global batch (:func:`local_rows`).  With
``random_flip``, row ``b`` of an :class:`ArrayDataset` step's batch is mirrored left–right when
``u_b < 1/2``, ``u = default_rng((seed, s, FLIP_STREAM)).random(B)``.  A run's data position is
therefore just its step: resuming at step ``s`` yields the same batches as an uninterrupted run.

A source read from files splits the examples into ``G`` **streams** so that each process reads only
its own files (:func:`batch_indices`): stream ``g`` owns the contiguous part
``[g·n/G, (g+1)·n/G)`` of the stored examples, runs the stream above over its part
(``perm = default_rng((seed, e, G, g)).permutation(n_g)``) and fills rows
``[g·B/G, (g+1)·B/G)`` of every global batch.  ``G = 1`` is the single stream above.  The order
depends on ``(seed, step, G)`` only, never on the process count: a run resumed on other processes
continues the same batches, and every example of stream ``g`` is seen once per epoch of that stream.
Epoch permutations are computed once and cached (:func:`epoch_permutation`).
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kindjax.io.paths import as_path, read_json, write_json

#: Third seed word of the flip draws, so they never share a stream with the permutations.
FLIP_STREAM = 1

Batch = dict[str, np.ndarray]


#: Epoch permutations computed so far, by stream: ``{(n, stream entropy): {epoch: permutation}}``.
_PERMUTATIONS: dict[tuple, dict[int, np.ndarray]] = {}
_PERMUTATIONS_LOCK = threading.Lock()


def epoch_permutation(n: int, seed: int, epoch: int, stream: tuple[int, ...] = ()) -> np.ndarray:
    """``default_rng((seed, epoch, *stream)).permutation(n)`` (read-only), computed once: the last two
    epochs of each stream are cached, so a step costs no permutation after the first of its epoch."""
    key = (n, seed, stream)
    with _PERMUTATIONS_LOCK:
        cached = _PERMUTATIONS.get(key, {}).get(epoch)
    if cached is not None:
        return cached
    perm = np.random.default_rng((seed, epoch, *stream)).permutation(n)
    perm.flags.writeable = False
    with _PERMUTATIONS_LOCK:
        if len(_PERMUTATIONS) > 4096:   # many data sets in one process (tests): start afresh
            _PERMUTATIONS.clear()
        epochs = _PERMUTATIONS.setdefault(key, {})
        epochs[epoch] = perm
        for old in sorted(epochs)[:-2]:
            del epochs[old]
    return perm


def _stream(n: int, step: int, batch_size: int, seed: int, stream: tuple[int, ...]) -> np.ndarray:
    """``stream[step·B : (step+1)·B]`` of ``perm(seed, 0, *stream) ++ perm(seed, 1, *stream) ++ …``."""
    if step < 0 or batch_size <= 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got {step}, {batch_size}")
    if n == 0:
        raise ValueError("cannot draw batches from an empty data set")
    start = step * batch_size
    stop = start + batch_size
    first_epoch, last_epoch = start // n, (stop - 1) // n
    if first_epoch == last_epoch:
        return epoch_permutation(n, seed, first_epoch, stream)[start - first_epoch * n:stop - first_epoch * n]
    stream_ = np.concatenate([epoch_permutation(n, seed, epoch, stream)
                              for epoch in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * n
    return stream_[offset:offset + batch_size]


def stream_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """``stream[step·B : (step+1)·B]`` of the stream of ``n`` examples (see module docstring):
    ``stream = perm(seed, 0) ++ perm(seed, 1) ++ …``, ``perm(seed, e) = default_rng((seed, e)).permutation(n)``."""
    return _stream(n, step, batch_size, seed, ())


def stream_part(n: int, streams: int, g: int) -> tuple[int, int]:
    """``[g·n/G, (g+1)·n/G)``: the examples that stream ``g`` of ``G`` owns."""
    return g * n // streams, (g + 1) * n // streams


def batch_indices(n: int, step: int, batch_size: int, seed: int, streams: int = 1, lo: int = 0,
                  hi: int | None = None) -> np.ndarray:
    """Example indices of rows ``[lo, hi)`` of the global batch of ``step`` with ``streams`` streams
    (module docstring); only the streams that fill those rows are computed."""
    hi = batch_size if hi is None else hi
    if streams == 1:
        return stream_indices(n, step, batch_size, seed)[lo:hi]
    if batch_size % streams or not 0 < streams <= n:
        raise ValueError(f"{streams} data streams need batch_size={batch_size} to be a multiple of them and at "
                         f"least one of the {n} examples each")
    per = batch_size // streams
    first, last = lo // per, -(-hi // per)
    parts = []
    for g in range(first, last):
        a, b = stream_part(n, streams, g)
        parts.append(a + _stream(b - a, step, per, seed, (streams, g)))
    return np.concatenate(parts)[lo - first * per:hi - first * per]


def flip_draws(step: int, batch_size: int, seed: int) -> np.ndarray:
    """``u_b < 1/2`` for the ``B`` rows of the step's batch, ``u = default_rng((seed, step, FLIP_STREAM)).random(B)``:
    which rows are mirrored (or take the mirrored view)."""
    return np.random.default_rng((seed, step, FLIP_STREAM)).random(batch_size) < 0.5


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``(lo, hi)``: process ``p`` of ``P`` holds rows ``[p·B/P, (p+1)·B/P)`` of a global batch of ``B``
    rows; ``B`` must split evenly over the processes."""
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"batch_size={batch_size} must split evenly over {process_count} processes and "
                         f"process_index={process_index} be in [0, {process_count})")
    return process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count


class Batches(Iterator[tuple[int, Batch]]):
    """``(step, local batch)`` for steps ``start_step, start_step + 1, …``; :meth:`close` (or leaving
    the ``with`` block) ends the iteration and frees what it holds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Ends the iteration; later ``next`` calls raise StopIteration."""

    def finish(self, placed: dict[str, Any]) -> dict[str, Any]:
        """The step's batch from a local batch of this iterator placed on the devices (by default the
        batch itself; the latents draw ``z = mean + std·ε`` from the placed moments here)."""
        return placed

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StepBatches(Batches):
    """:class:`Batches` made on demand, in the caller's thread, by ``make_batch(step)``."""

    def __init__(self, make_batch: Callable[[int], Batch], start_step: int) -> None:
        self._make_batch, self._step, self._closed = make_batch, start_step, False

    def __next__(self) -> tuple[int, Batch]:
        if self._closed:
            raise StopIteration
        step = self._step
        batch = self._make_batch(step)
        self._step += 1
        return step, batch

    def close(self) -> None:
        self._closed = True


class DeviceBatches(Batches):
    """``(step, batch on the devices)``: each local batch of ``host`` is placed (``place``: an asynchronous
    copy) and finished (``host.finish``) ``depth`` steps before it is consumed, so the copies of later
    steps overlap the current step."""

    def __init__(self, host: Batches, place: Callable[[Batch], dict[str, Any]], depth: int) -> None:
        if depth < 0:
            raise ValueError(f"device prefetch depth must be >= 0, got {depth}")
        self._host, self._place, self._depth = host, place, depth
        self._ahead: collections.deque = collections.deque()

    def __next__(self) -> tuple[int, dict[str, Any]]:
        while len(self._ahead) <= self._depth:
            step, local = next(self._host)
            self._ahead.append((step, self._host.finish(self._place(local))))
        return self._ahead.popleft()

    def close(self) -> None:
        self._ahead.clear()
        self._host.close()


LAYOUT_NAME = "data_layout.json"


def note_process_count(workdir: str, process_count: int, write: bool) -> str | None:
    """Records the run's process count in ``WORKDIR/data_layout.json`` (when ``write``: process 0) and,
    when a resumed run has another count, returns the line that says what changed."""
    path = as_path(workdir) / LAYOUT_NAME
    before = read_json(path).get("process_count") if path.exists() else None
    if write:
        write_json(path, {"process_count": process_count}, atomic=True)
    if before is None or before == process_count:
        return None
    return (f"data: resumed on {process_count} processes, the run before used {before}; the batches are a "
            f"function of (seed, step) alone, so they continue unchanged, and each process now reads its "
            f"1/{process_count} of every batch (the latents: only the shards of those rows)")


@runtime_checkable
class TrainingSource(Protocol):
    """A training data set: the global batch of a step is a pure function of ``(step, batch_size, seed)``
    in the data order of :func:`stream_indices`, and each process reads only its rows (:func:`local_rows`)."""

    num_classes: int

    def local_batch(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> Batch:
        """Rows ``[p·B/P, (p+1)·B/P)`` of the step's global batch: ``image`` (B/P, H, W, C) float32,
        ``label`` (B/P,) int32."""

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The whole global batch of ``step`` (``local_batch`` with one process)."""

    def batches(self, start_step: int, batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> Batches:
        """``local_batch`` of steps ``start_step, start_step + 1, …``, each as ``(step, batch)`` (or a
        compact form of it that :meth:`Batches.finish` completes once placed on the devices)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A :class:`TrainingSource` held in memory: images (float32 NHWC in [-1, 1]) with int32 labels
    in ``0..num_classes-1``; ``random_flip`` mirrors each batch row with probability 1/2 (see module
    docstring)."""

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

    def local_batch(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> Batch:
        """Rows ``[p·B/P, (p+1)·B/P)`` of the step's batch: ``image`` (B/P,H,W,C) float32, ``label`` int32."""
        lo, hi = local_rows(batch_size, process_index, process_count)
        idx = self.indices(step, batch_size, seed)[lo:hi]
        images = self.images[idx]
        if self.random_flip:
            flip = flip_draws(step, batch_size, seed)[lo:hi]
            images[flip] = images[flip, :, ::-1]
        return {"image": images, "label": self.labels[idx]}

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The batch of ``step``: ``dict(image=(B,H,W,C) float32, label=(B,) int32)``."""
        return self.local_batch(step, batch_size, seed)

    def batches(self, start_step: int, batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> Batches:
        """Local batches of steps ``start_step, start_step + 1, …``, each made when it is asked for."""
        return StepBatches(lambda step: self.local_batch(step, batch_size, seed, process_index, process_count),
                           start_step)


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
