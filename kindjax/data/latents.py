"""SD-VAE latents written by ``python -m kindjax.encode``: a sharded, prefetching data set.

Batching follows :func:`kindjax.data.pipeline.stream_indices`, as ArrayDataset's does: step ``s`` takes
``stream[s·B : (s+1)·B]`` of the stream of per-epoch permutations of the examples, so a
batch is a pure function of ``(seed, step)``.  Row ``r`` of that global batch is

    image_r = scale · (mean_v + std_v ⊙ ε),   (v, ε) drawn from default_rng((seed, 1, step, r))

where ``(mean_v, std_v)`` are the stored posterior moments of view ``v`` of the example
(v = 0 the image; v ∈ {0, 1} uniformly with ``config.data.random_flip``, which needs the
mirrored view, encoded with ``config.vae.flips``), and ε ~ N(0, I).  A process computes only its rows
``[p·B/P, (p+1)·B/P)`` and reads only the shard rows they need (memory-mapped ``.npy``).
"""
from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.data.class_groups import select_classes
from kindjax.data.pipeline import Batch, Batches, local_rows, stream_indices

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
NOISE_STREAM = 1   # tags the per-row noise seeds apart from the permutation seeds (seed, epoch)


class LatentDataset:
    """A :class:`kindjax.data.pipeline.TrainingSource` of posterior moments ``(n, views, 2, h, w, c)``
    in shards; the stored (base) classes are selected and relabelled by ``grouping``, ``task``,
    ``classes`` as an image source's are (:func:`kindjax.data.class_groups.select_classes`)."""

    def __init__(self, root: str, index: dict, grouping: str = "", task: str = "", classes: Sequence[int] = (),
                 scale: float = 0.18215, random_flip: bool = True, prefetch_depth: int = 2) -> None:
        self.root, self.index, self.scale, self.prefetch_depth = root, index, float(scale), prefetch_depth
        self.latent_shape = tuple(index["latent_shape"])
        if random_flip and int(index["views"]) < 2:
            raise ConfigError(f"the latents in {root} hold no mirrored views (encoded with vae.flips=False); "
                              f"set data.random_flip=False, or re-encode with vae.flips=True")
        self.views = int(index["views"]) if random_flip else 1
        shards = [s for s in index["shards"] if s["count"] > 0]
        self._names = [s["name"] for s in shards]
        self._starts = np.cumsum([0] + [s["count"] for s in shards])
        labels = np.concatenate([self._open(k, "labels") for k in range(len(shards))] or [np.zeros(0, np.int32)])
        selection = select_classes(index["class_names"], grouping, task, classes)
        labels = selection.base_to_label[labels]
        self.positions = np.flatnonzero(labels >= 0)
        self.labels = labels[self.positions].astype(np.int32)
        self.num_classes, self.class_names = selection.num_classes, selection.class_names
        self._moments = [self._open(k, "moments") for k in range(len(shards))]

    def _open(self, k: int, kind: str) -> np.ndarray:
        """Memory map of shard ``k``'s ``moments`` or ``labels``, checked against the index."""
        path = os.path.join(self.root, f"{self._names[k]}.{kind}.npy")
        count = int(self._starts[k + 1] - self._starts[k])
        want = (count,) if kind == "labels" else (count, int(self.index["views"]), 2) + self.latent_shape
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"latent shard {path} is missing or unreadable ({e}); rerun python -m kindjax.encode "
                              f"with the same --out to rewrite it") from None
        if array.shape != want:
            raise ConfigError(f"latent shard {path} has shape {array.shape}, the index says {want}; the latent "
                              f"directory is corrupt: re-encode it")
        return array

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Example indices of the global batch of ``step`` (see :func:`stream_indices`)."""
        return stream_indices(len(self), step, batch_size, seed)

    def local_batch(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> Batch:
        """Rows ``[p·B/P, (p+1)·B/P)`` of the global batch: ``image`` (B/P, h, w, c) float32, ``label`` int32."""
        lo, hi = local_rows(batch_size, process_index, process_count)
        idx = self.indices(step, batch_size, seed)[lo:hi]
        pos = self.positions[idx]
        shard = np.searchsorted(self._starts, pos, side="right") - 1
        offset = pos - self._starts[shard]
        rngs = [np.random.default_rng((seed, NOISE_STREAM, step, r)) for r in range(lo, hi)]
        view = np.asarray([rng.integers(self.views) for rng in rngs])
        moments = np.empty((hi - lo, 2) + self.latent_shape, np.float32)
        for k in np.unique(shard):
            rows = np.flatnonzero(shard == k)
            order = rows[np.argsort(offset[rows], kind="stable")]
            moments[order] = self._moments[k][offset[order], view[order]]
        eps = np.stack([rng.standard_normal(self.latent_shape, dtype=np.float32) for rng in rngs])
        image = self.scale * (moments[:, 0] + moments[:, 1] * eps)
        return {"image": image.astype(np.float32), "label": self.labels[idx]}

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The whole global batch of ``step`` (single-process use)."""
        return self.local_batch(step, batch_size, seed)

    def batches(self, start_step: int, batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, depth: int | None = None) -> Prefetcher:
        """Local batches of steps ``start_step, start_step + 1, …`` prepared ``depth`` steps ahead
        (default ``prefetch_depth``, i.e. ``config.vae.prefetch``)."""
        return Prefetcher(lambda s: self.local_batch(s, batch_size, seed, process_index, process_count),
                          start_step, self.prefetch_depth if depth is None else depth)


class Prefetcher(Batches):
    """:class:`Batches` of ``make_batch(step)`` from ``start_step`` on, filled by a background thread
    through a queue of ``depth`` entries.  A new prefetcher restarts at any step; :meth:`close` stops
    the thread."""

    def __init__(self, make_batch: Callable[[int], Batch], start_step: int, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be ≥ 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make_batch, start_step), daemon=True)
        self._thread.start()

    def _fill(self, make_batch: Callable[[int], Batch], step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, make_batch(step), None)
            except Exception as e:  # handed to the consumer, raised there
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def __next__(self) -> tuple[int, Batch]:
        if self._stop.is_set():
            raise StopIteration
        step, batch, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        return step, batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def read_index(root: str) -> dict:
    """The ``index.json`` of a latent directory, checked for the keys the loader needs."""
    path = os.path.join(root, INDEX_NAME)
    if not os.path.exists(path):
        raise ConfigError(f"no {INDEX_NAME} in data.root={root!r}: encode the images first with "
                          f"python -m kindjax.encode --config CONFIG --vae VAE_DIR --out {root or 'LATENT_DIR'} "
                          f"(an unfinished encode has no index yet: rerun the same command to finish it)")
    try:
        with open(path) as f:
            index = json.load(f)
        if index["format"] != INDEX_FORMAT:
            raise ValueError(f"format {index['format']}, this kindjax reads format {INDEX_FORMAT}")
        missing = [k for k in ("latent_shape", "views", "num_classes", "class_names", "shards", "num_examples")
                   if k not in index]
        if missing:
            raise KeyError(f"keys {missing} missing")
        if sum(s["count"] for s in index["shards"]) != index["num_examples"]:
            raise ValueError("shard counts do not add up to num_examples")
        if len(index["class_names"]) != index["num_classes"]:
            raise ValueError("class_names and num_classes disagree")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it and rerun "
                          f"python -m kindjax.encode with the same --out to rewrite it") from None
    return index


def open_latents(config: ml_collections.ConfigDict) -> LatentDataset:
    """The latent data set at ``config.data.root`` with the class selection of ``config.data``
    (grouping, task, classes), scaled by ``config.vae.scale``; checks the latents fit ``config.model``."""
    root = config.data.root
    if not root:
        raise ConfigError("data.name='latents' needs data.root, the --out directory of python -m kindjax.encode")
    d = config.data
    dataset = LatentDataset(root, read_index(root), grouping=d.grouping, task=d.task, classes=tuple(d.classes),
                            scale=config.vae.scale, random_flip=config.data.random_flip,
                            prefetch_depth=config.vae.prefetch)
    h, w, c = dataset.latent_shape
    m = config.model
    if (m.image_size, m.image_size, m.in_channels) != (h, w, c):
        raise ConfigError(f"the latents in {root} are {h}×{w}×{c} but model.image_size={m.image_size}, "
                          f"model.in_channels={m.in_channels}; set --config.model.image_size={h} "
                          f"--config.model.in_channels={c}")
    if dataset.num_classes != m.num_classes:
        raise ConfigError(f"the latent class selection has {dataset.num_classes} classes but model.num_classes="
                          f"{m.num_classes}; set model.num_classes={dataset.num_classes}")
    return dataset
