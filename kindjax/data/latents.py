"""SD-VAE latents written by ``python -m kindjax.tools.encode``: a sharded, per-process, prefetching data set.

Batching follows :func:`kindjax.data.pipeline.batch_indices` with ``G`` streams (``data.streams``):
step ``s``'s global batch is a pure function of ``(seed, s, G)``, and process ``p`` of ``P`` computes
only its rows ``[p·B/P, (p+1)·B/P)``, which come from the streams that fill them, so it opens and
reads only the shards of those streams' parts.  Row ``r`` of the global batch is

    image_r = scale · (mean_v + std_v ⊙ ε_r),   ε_r ~ N(0, I) from the JAX key
    fold_in(fold_in(fold_in(key(seed), NOISE_STREAM), s), r)

where ``(mean_v, std_v)`` are the stored posterior moments of view ``v`` of the example (v = 1, the
mirrored view, for the rows :func:`kindjax.data.pipeline.flip_draws` picks with
``config.data.random_flip``, which needs moments encoded with ``config.vae.flips``; else v = 0).
The loader delivers the moments in their stored dtype (float16, bfloat16 or float32) with the row
ids; ε is drawn where the moments are placed (:func:`draw_latents`: on the accelerator in training,
the same function on the host for :meth:`LatentDataset.local_batch`), so both give the same batch.

Start-up checks (every shard, from file headers and sizes, and its labels; nothing is read as
garbage): a missing, truncated or wrong-shape shard, one whose moments were non-finite when encoded,
or one with a label outside the index's classes, is named in a one-line :class:`ConfigError` with
the command that repairs it (:func:`repair_command`) (or skipped and counted with
``data.bad_shards="skip"``); an index that disagrees with its shards is refused;
``data.verify_latents="full"`` also scans this process's shards for NaN/Inf.
"""
from __future__ import annotations

import functools
import os
import queue
import re
import shlex
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from kindjax.config import ConfigError
from kindjax.data.class_groups import select_classes
from kindjax.io.paths import as_path, is_uri, load_npy, read_json
from kindjax.data.pipeline import Batch, Batches, batch_indices, flip_draws, local_rows, stream_part

INDEX_NAME = "index.json"
PLAN_NAME = "encode.json"
INDEX_FORMAT = 1
NOISE_STREAM = 1   # tags the noise keys apart from other uses of the seed
#: Stored dtypes of the moments: name → the dtype the loader hands on (bfloat16 is stored as its uint16 bits).
MOMENT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: Largest number of streams ``data.streams=0`` chooses.
MAX_AUTO_STREAMS = 64


def file_dtype(name: str) -> np.dtype:
    """The dtype of a ``.moments.npy`` file holding moments of dtype ``name`` (bfloat16: uint16 bits)."""
    return np.dtype(np.uint16) if name == "bfloat16" else MOMENT_DTYPES[name]


def shard_number(name: str) -> int:
    """``k`` of the shard named ``shard_<k>``."""
    return int(name.rsplit("_", 1)[1])


def npy_problem(path: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What is wrong with the ``.npy`` file at ``path`` for an array of ``shape`` and ``dtype`` (from its
    header and size alone: missing, unreadable, other shape or dtype, truncated), or None."""
    try:
        with as_path(path).open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version}")
            got_shape, fortran, got_dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:
        return f"is unreadable ({e})"
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype or fortran:
        return f"holds {got_dtype} {tuple(got_shape)}, expected {dtype} {tuple(shape)}"
    size, want = as_path(path).stat().length, offset + int(np.prod(shape)) * dtype.itemsize
    if size != want:
        return f"is truncated ({size} of {want} bytes)" if size < want else f"has {size - want} bytes too many"
    return None


def shard_problem(root: str, name: str, count: int, views: int, latent_shape: Sequence[int],
                  dtype: str) -> str | None:
    """The first problem of shard ``name``'s two files (``<file> <problem>``), or None if both check out."""
    for kind, shape, dt in (("moments", (count, views, 2, *latent_shape), file_dtype(dtype)),
                            ("labels", (count,), np.dtype(np.int32))):
        path = os.path.join(root, f"{name}.{kind}.npy")
        problem = npy_problem(path, shape, dt)
        if problem is not None:
            return f"{path} {problem}"
    return None


#: The overrides a repair command repeats from the encode's invocation (anything else is dropped).
OVERRIDE = re.compile(r"--config\.[A-Za-z0-9_.]+=.*", re.DOTALL)


def repair_command(root: str, redo: Sequence[int] = ()) -> str:
    """The ``python -m kindjax.tools.encode`` command that repairs ``root``: the invocation the encode
    recorded in its plan (working directory, config file, ``--config.*`` overrides, VAE, dtype), every
    field shell-quoted and ``--out`` the directory itself, so a plan from elsewhere can name no other
    command; ``redo``: shards to encode again whatever their files say (``--redo``).  A rerun
    re-encodes missing, damaged or non-finite shards and rewrites the index."""
    try:
        call = read_json(os.path.join(root, PLAN_NAME)).get("invocation") or {}
    except (OSError, ValueError, AttributeError):
        call = {}
    call = call if isinstance(call, dict) else {}
    text = lambda key: call.get(key) if isinstance(call.get(key), str) and call.get(key) else None   # noqa: E731
    words = ["python", "-m", "kindjax.tools.encode", "--config", text("config") or "CONFIG"]
    words += ["--vae", text("vae") or "VAE_DIR", "--out", root]
    if text("dtype"):
        words += ["--dtype", text("dtype")]
    overrides = call.get("overrides") if isinstance(call.get("overrides"), list) else []
    words += [o for o in overrides if isinstance(o, str) and OVERRIDE.fullmatch(o)]
    if redo:
        words.append("--redo=" + ",".join(str(int(k)) for k in redo))
    command = shlex.join(words)
    return f"cd {shlex.quote(text('cwd'))} && {command}" if text("cwd") else command


@functools.partial(jax.jit, static_argnames="scale")
def draw_latents(moments: jax.Array, noise_ids: jax.Array, scale: float) -> jax.Array:
    """``scale·(mean + std ⊙ ε)`` for moments ``(b, 2, h, w, c)`` and rows ``noise_ids = (seed, step, r)``
    (``(b, 3)`` uint32), ``ε_r ~ N(0, I)`` from ``fold_in(fold_in(fold_in(key(seed), NOISE_STREAM), step), r)``;
    float32 ``(b, h, w, c)``.  Each row depends on its ids alone, so any split of the rows gives the same rows."""
    def row(m: jax.Array, ids: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(ids[0]), NOISE_STREAM),
                                                    ids[1]), ids[2])
        eps = jax.random.normal(key, m.shape[1:], jnp.float32)
        return scale * (m[0].astype(jnp.float32) + m[1].astype(jnp.float32) * eps)

    return jax.vmap(row)(moments, noise_ids)


class LatentDataset:
    """A :class:`kindjax.data.pipeline.TrainingSource` of posterior moments ``(n, views, 2, h, w, c)``
    in shards; the stored (base) classes are selected and relabelled by ``grouping``, ``task``,
    ``classes`` as an image source's are (:func:`kindjax.data.class_groups.select_classes`).

    ``streams``: the data order's ``G`` (0: the largest divisor of the batch size ≤ min(64, n));
    ``workers``: threads preparing local batches; ``bad_shards``: "error" or "skip" (drop and count
    shards that fail the start-up checks); ``verify``: "sizes", or "full" to also scan this
    process's shards for NaN/Inf when batches start."""

    def __init__(self, root: str, index: dict, grouping: str = "", task: str = "", classes: Sequence[int] = (),
                 scale: float = 0.18215, random_flip: bool = True, prefetch_depth: int = 2, streams: int = 0,
                 workers: int = 1, bad_shards: str = "error", verify: str = "sizes",
                 log: Callable[[str], None] = print) -> None:
        self.root, self.index, self.scale, self.prefetch_depth = root, index, float(scale), prefetch_depth
        self.streams, self.workers, self.verify, self.log = streams, workers, verify, log
        self.latent_shape = tuple(index["latent_shape"])
        self.dtype = index.get("dtype", "float32")
        if self.dtype not in MOMENT_DTYPES:
            raise ConfigError(f"{os.path.join(root, INDEX_NAME)} stores moments as {self.dtype!r}; this kindjax "
                              f"reads {sorted(MOMENT_DTYPES)}")
        if random_flip and int(index["views"]) < 2:
            raise ConfigError(f"the latents in {root} hold no mirrored views (encoded with vae.flips=False); "
                              f"set data.random_flip=False, or re-encode with vae.flips=True")
        self.random_flip = random_flip
        shards, shard_labels = self._checked_shards(bad_shards)
        self._names = [s["name"] for s in shards]
        self._starts = np.cumsum([0] + [s["count"] for s in shards])
        labels = np.concatenate([shard_labels[n] for n in self._names] or [np.zeros(0, np.int32)])
        selection = select_classes(index["class_names"], grouping, task, classes)
        labels = selection.base_to_label[labels]
        self.positions = np.flatnonzero(labels >= 0)
        self.labels = labels[self.positions].astype(np.int32)
        self.num_classes, self.class_names = selection.num_classes, selection.class_names
        self._moments: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _checked_shards(self, bad_shards: str) -> tuple[list[dict], dict[str, np.ndarray]]:
        """The index's non-empty shards that pass the start-up checks (module docstring), and their
        labels (each a class of the index)."""
        index, root = self.index, self.root
        shards, bad, labels = [], [], {}
        for s in index["shards"]:
            info_path = os.path.join(root, s["name"] + ".json")
            if as_path(info_path).exists():
                info = read_json(info_path)
                if info.get("count") != s["count"]:
                    raise ConfigError(f"{os.path.join(root, INDEX_NAME)} does not match its shards: {s['name']} "
                                      f"holds {info.get('count')} examples, the index says {s['count']}; rerun "
                                      f"{repair_command(root)} to rewrite the index")
            if s["count"] == 0:
                continue
            problem = shard_problem(root, s["name"], s["count"], int(index["views"]), self.latent_shape, self.dtype)
            if problem is None and s.get("finite") is False:
                problem = (f"{os.path.join(root, s['name'] + '.moments.npy')} holds NaN or Inf moments (found "
                           f"when it was encoded: the VAE gave non-finite values)")
            if problem is None:
                path = os.path.join(root, s["name"] + ".labels.npy")
                labels[s["name"]] = load_npy(path)
                out = labels[s["name"]][(labels[s["name"]] < 0) | (labels[s["name"]] >= int(index["num_classes"]))]
                if out.size:
                    problem = (f"{path} holds {out.size} labels outside the {index['num_classes']} classes of the "
                               f"index (e.g. {int(out[0])})")
            (bad if problem else shards).append((s, problem))
        if bad and bad_shards == "error":
            more = f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else ""
            fix = repair_command(root, [shard_number(s["name"]) for s, _ in bad])
            raise ConfigError(f"latent shard {bad[0][1]}{more}; rerun {fix} to re-encode it, or set "
                              f"data.bad_shards=skip to train without it")
        if bad:
            lost = sum(s["count"] for s, _ in bad)
            self.log(f"latents: skipping {len(bad)} bad shards ({lost} examples; data.bad_shards=skip): "
                     + "; ".join(p for _, p in bad))
        self.skipped_shards = [s["name"] for s, _ in bad]
        return [s for s, _ in shards], labels

    def _shard(self, k: int) -> np.ndarray:
        """Shard ``k``'s moments in their stored dtype (opened on first use): a memory map of a local
        file; a cloud object (``gs://``) is read whole into memory."""
        array = self._moments.get(k)
        if array is None:
            with self._lock:
                path = os.path.join(self.root, f"{self._names[k]}.moments.npy")
                array = load_npy(path) if is_uri(path) else np.load(path, mmap_mode="r")
                if self.dtype == "bfloat16":
                    array = array.view(MOMENT_DTYPES["bfloat16"])
                self._moments[k] = array
        return array

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def opened_shards(self) -> list[int]:
        """The shards whose moments this data set has opened so far."""
        return sorted(self._moments)

    def streams_for(self, batch_size: int) -> int:
        """``G`` of the data order for ``batch_size`` (``data.streams``, or 0: the largest divisor of
        ``batch_size`` that is at most ``min(64, n)``)."""
        if self.streams:
            return self.streams
        top = max(1, min(MAX_AUTO_STREAMS, len(self), batch_size))
        return max(g for g in range(1, top + 1) if batch_size % g == 0)

    def indices(self, step: int, batch_size: int, seed: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Example indices of rows ``[lo, hi)`` of the global batch of ``step`` (:func:`batch_indices`)."""
        streams = self.streams_for(batch_size)
        if batch_size % streams or streams > len(self):
            raise ConfigError(f"data.streams={streams} does not fit batch_size={batch_size} and the {len(self)} "
                              f"examples (each stream fills B/G rows and owns at least one example); set "
                              f"data.streams to a divisor of the batch size, or 0 to choose one")
        return batch_indices(len(self), step, batch_size, seed, streams, lo, hi)

    def shards_read(self, batch_size: int, process_index: int = 0, process_count: int = 1) -> list[int]:
        """The shards (by position among the good ones) that process ``p`` of ``P`` ever reads: those of
        the parts of the streams that fill its rows."""
        lo, hi = local_rows(batch_size, process_index, process_count)
        g_count = self.streams_for(batch_size)
        per = batch_size // g_count
        parts = [stream_part(len(self), g_count, g) for g in range(lo // per, -(-hi // per))]
        first, last = self.positions[parts[0][0]], self.positions[parts[-1][1] - 1]
        return list(range(int(np.searchsorted(self._starts, first, side="right") - 1),
                          int(np.searchsorted(self._starts, last, side="right"))))

    def local_moments(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Batch:
        """This process's rows of the step's batch before the noise: ``moments`` (b, 2, h, w, c) in the
        stored dtype (the chosen view), ``label`` (b,) int32, ``noise`` (b, 3) uint32 rows ``(seed, step, r)``."""
        lo, hi = local_rows(batch_size, process_index, process_count)
        idx = self.indices(step, batch_size, seed, lo, hi)
        pos = self.positions[idx]
        view = flip_draws(step, batch_size, seed)[lo:hi].astype(np.intp) if self.random_flip else np.zeros(
            hi - lo, np.intp)
        shard = np.searchsorted(self._starts, pos, side="right") - 1
        offset = pos - self._starts[shard]
        moments = np.empty((hi - lo, 2) + self.latent_shape, MOMENT_DTYPES[self.dtype])
        for k in np.unique(shard):
            rows = np.flatnonzero(shard == k)
            order = rows[np.argsort(offset[rows], kind="stable")]
            moments[order] = self._shard(int(k))[offset[order], view[order]]
        noise = np.empty((hi - lo, 3), np.uint32)
        noise[:, 0], noise[:, 1], noise[:, 2] = seed, step, np.arange(lo, hi)
        return {"moments": moments, "label": self.labels[idx], "noise": noise}

    def finish(self, placed: dict[str, Any]) -> dict[str, Any]:
        """``{image, label}`` from (placed) :meth:`local_moments`: ``image = scale·(mean + std·ε)`` (:func:`draw_latents`)."""
        return {"image": draw_latents(placed["moments"], placed["noise"], self.scale), "label": placed["label"]}

    def local_batch(self, step: int, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> Batch:
        """Rows ``[p·B/P, (p+1)·B/P)`` of the global batch: ``image`` (B/P, h, w, c) float32, ``label`` int32."""
        batch = self.finish(self.local_moments(step, batch_size, seed, process_index, process_count))
        return {"image": np.asarray(batch["image"]), "label": batch["label"]}

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The whole global batch of ``step`` (single-process use)."""
        return self.local_batch(step, batch_size, seed)

    def check_finite(self, shards: Sequence[int], chunk: int = 1024) -> None:
        """Scans the moments of ``shards`` for NaN/Inf; a :class:`ConfigError` names the first bad shard."""
        for k in shards:
            array = self._shard(k)
            for lo in range(0, array.shape[0], chunk):
                if not np.isfinite(array[lo:lo + chunk]).all():
                    path = os.path.join(self.root, self._names[k] + ".moments.npy")
                    raise ConfigError(f"latent shard {path} holds NaN or Inf moments; rerun "
                                      f"{repair_command(self.root, [shard_number(self._names[k])])} to re-encode "
                                      f"it, or set data.bad_shards=skip and data.verify_latents=sizes to train "
                                      f"without it")

    def batches(self, start_step: int, batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, depth: int | None = None, workers: int | None = None) -> Prefetcher:
        """:meth:`local_moments` of steps ``start_step, start_step + 1, …`` prepared ``depth`` steps ahead
        (default ``prefetch_depth``) by ``workers`` threads; :meth:`Prefetcher.finish` completes them."""
        local_rows(batch_size, process_index, process_count)
        self.indices(start_step, batch_size, seed)   # a bad stream count is an error here, not in a thread
        reads = self.shards_read(batch_size, process_index, process_count)
        if self.verify == "full":
            self.check_finite(reads)
        self.log(f"latents: process {process_index} of {process_count} reads {len(reads)} of "
                 f"{len(self._names)} shards ({self.streams_for(batch_size)} data streams)")
        return Prefetcher(lambda s: self.local_moments(s, batch_size, seed, process_index, process_count),
                          start_step, self.prefetch_depth if depth is None else depth,
                          self.workers if workers is None else workers, self.finish)


class Prefetcher(Batches):
    """:class:`Batches` of ``make_batch(step)`` from ``start_step`` on, made by ``workers`` background
    threads (worker ``w`` makes steps ``start_step + w + i·workers``), at most ``depth`` steps ahead of the
    consumer, which takes them in order.  A new prefetcher restarts at any step; :meth:`close` stops it."""

    def __init__(self, make_batch: Callable[[int], Batch], start_step: int, depth: int, workers: int = 1,
                 finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if depth < 1 or workers < 1:
            raise ValueError(f"prefetch depth and workers must be ≥ 1, got {depth}, {workers}")
        self._finish = finish
        self._queues = [queue.Queue(maxsize=max(1, depth // workers)) for _ in range(workers)]
        self._stop = threading.Event()
        self._next = start_step
        self._start = start_step
        self._threads = [threading.Thread(target=self._fill, args=(make_batch, start_step + w, workers, q),
                                          daemon=True) for w, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def _fill(self, make_batch: Callable[[int], Batch], step: int, stride: int, out: queue.Queue) -> None:
        while not self._stop.is_set():
            try:
                item = (step, make_batch(step), None)
            except Exception as e:  # handed to the consumer, raised there
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += stride

    def __next__(self) -> tuple[int, Batch]:
        if self._stop.is_set():
            raise StopIteration
        step, batch, error = self._queues[(self._next - self._start) % len(self._queues)].get()
        if error is not None:
            self.close()
            raise error
        self._next += 1
        return step, batch

    def finish(self, placed: dict[str, Any]) -> dict[str, Any]:
        return placed if self._finish is None else self._finish(placed)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def read_index(root: str) -> dict:
    """The ``index.json`` of a latent directory, checked for the keys the loader needs."""
    path = os.path.join(root, INDEX_NAME)
    if not as_path(path).exists():
        raise ConfigError(f"no {INDEX_NAME} in data.root={root!r}: encode the images first with "
                          f"python -m kindjax.tools.encode --config CONFIG --vae VAE_DIR --out {root or 'LATENT_DIR'} "
                          f"(an unfinished encode has no index yet: rerun the same command to finish it)")
    try:
        index = read_json(path)
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
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e}); rerun {repair_command(root)} "
                          f"to rewrite it") from None
    return index


def open_latents(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> LatentDataset:
    """The latent data set at ``config.data.root`` with the class selection of ``config.data``
    (grouping, task, classes), scaled by ``config.vae.scale``, read as ``data.streams``/``workers``/
    ``bad_shards``/``verify_latents`` say; checks the latents fit ``config.model``."""
    root = config.data.root
    if not root:
        raise ConfigError("data.name='latents' needs data.root, the --out directory of python -m kindjax.tools.encode")
    d = config.data
    dataset = LatentDataset(root, read_index(root), grouping=d.grouping, task=d.task, classes=tuple(d.classes),
                            scale=config.vae.scale, random_flip=d.random_flip, prefetch_depth=config.vae.prefetch,
                            streams=d.streams, workers=d.workers, bad_shards=d.bad_shards,
                            verify=d.verify_latents, log=log)
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
