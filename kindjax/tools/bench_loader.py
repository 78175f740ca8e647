"""Latent-loader benchmark (``python -m kindjax.tools.bench --suite loader``): images/s one process delivers
to its device, and a simulated multi-process run.

On a synthetic latent directory of ImageNet's shape (``--loader_images`` examples, 32×32×4 moments
with flips, ``--loader_dtype``, shards of 4096; written once into ``--loader_dir``, or a temporary
directory), the loader of :mod:`kindjax.data.latents` runs as the trainer runs it
(:class:`kindjax.data.pipeline.DeviceBatches` over ``LatentDataset.batches``, batch ``--loader_batch``):

- ``placed``: the moments, labels and noise ids of each step placed on the device (what the host
  delivers; the step then draws ``z = mean + std·ε`` on the accelerator);
- ``drawn``: the same plus the draw of ``z`` (:func:`kindjax.data.latents.draw_latents`), which on a
  CPU-only machine runs on the same cores as the loader.

Each is measured with 1 and 2 worker threads, in interleaved rounds (the median is reported, so the
load of a shared machine hits every variant alike).  The simulated run starts ``--loader_processes``
processes at once, each reading its own rows (``process_index`` of ``process_count``) for one epoch of
every stream; each reports its images/s and the shards it opened, and the parent checks, from the
labels delivered (the synthetic label of an example is its index), that the processes' rows are
disjoint, make up each global batch, and cover the epoch.  The last line printed is one JSON object.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import flags

from kindjax.data.latents import INDEX_NAME, LatentDataset, read_index
from kindjax.data.pipeline import Batch, Batches, DeviceBatches
from kindjax.tools.encode import PLAN_NAME, shard_name, write_index, write_shard
from kindjax.sharding import batch_sharding, make_mesh

LATENT_SHAPE, SHARD_SIZE = (32, 32, 4), 4096


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """One field per flag of :func:`define_flags` (``loader_`` prefix), same default."""

    dir: str = ""
    images: int = 50_000
    dtype: str = "float16"
    batch: int = 256
    steps: int = 40
    rounds: int = 3
    processes: int = 4


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The ``--loader_*`` flags (called when ``kindjax.tools.bench`` runs as a program)."""
    d, fv = LoaderOptions(), dict(flag_values=flag_values)
    flags.DEFINE_string("loader_dir", d.dir, "Synthetic latent directory (written once; '' = a temporary one).", **fv)
    flags.DEFINE_integer("loader_images", d.images, "Examples in the synthetic directory.", **fv)
    flags.DEFINE_enum("loader_dtype", d.dtype, ["float16", "bfloat16", "float32"], "Stored moment dtype.", **fv)
    flags.DEFINE_integer("loader_batch", d.batch, "Global batch size.", **fv)
    flags.DEFINE_integer("loader_steps", d.steps, "Timed steps per round.", **fv)
    flags.DEFINE_integer("loader_rounds", d.rounds, "Interleaved rounds per variant.", **fv)
    flags.DEFINE_integer("loader_processes", d.processes, "Processes of the simulated multi-process run.", **fv)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> LoaderOptions:
    return LoaderOptions(**{f.name: flag_values["loader_" + f.name].value for f in dataclasses.fields(LoaderOptions)})


def synthetic_latents(root: str, images: int, dtype: str, log: Callable[[str], None] = print) -> dict:
    """Writes (once) a latent directory of ``images`` examples with ImageNet's latent shape and two views,
    as ``kindjax.tools.encode`` does; example ``i`` has label ``i``.  Returns its index."""
    if os.path.exists(os.path.join(root, INDEX_NAME)):
        index = read_index(root)
        if index["num_examples"] == images and index.get("dtype", "float32") == dtype:
            return index
        raise ValueError(f"--loader_dir={root} holds another synthetic set ({index['num_examples']} examples, "
                         f"{index.get('dtype', 'float32')}); choose another directory")
    os.makedirs(root, exist_ok=True)
    num_shards = -(-images // SHARD_SIZE)
    plan = dict(format=1, num_images=images, shard_size=SHARD_SIZE, num_shards=num_shards, views=2, dtype=dtype,
                num_classes=images, class_names=[str(i) for i in range(images)], vae=dict(scaling_factor=0.18215),
                vae_path="", source={"name": "synthetic"})
    with open(os.path.join(root, PLAN_NAME), "w") as f:
        json.dump(plan, f)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((SHARD_SIZE, 2, 2) + LATENT_SHAPE, np.float32)
    base[:, :, 1] = np.abs(base[:, :, 1]) * 0.05
    start = time.time()
    for k in range(num_shards):
        lo, hi = k * SHARD_SIZE, min(images, (k + 1) * SHARD_SIZE)
        moments = base[:hi - lo] + np.float32(k * 1e-3)
        write_shard(root, k, moments, np.arange(lo, hi, dtype=np.int32), [], (256, 256, 3), dtype, log)
    log(f"wrote {images} synthetic latents ({num_shards} shards of {shard_name(0)}…, {dtype}) to {root} in "
        f"{time.time() - start:.0f} s")
    return write_index(root)


def open_synthetic(root: str, workers: int) -> LatentDataset:
    return LatentDataset(root, read_index(root), scale=0.18215, random_flip=True, workers=workers,
                         log=lambda s: None)


class Moments(Batches):
    """The latents' local batches handed on as they are placed (no draw of ``z``)."""

    def __init__(self, inner: Batches) -> None:
        self._inner = inner

    def __next__(self) -> tuple[int, Batch]:
        return next(self._inner)

    def close(self) -> None:
        self._inner.close()


def deliver(dataset: LatentDataset, start: int, steps: int, batch: int, draw: bool, mesh: Any,
            process_index: int = 0, process_count: int = 1, keep_labels: bool = False) -> tuple[float, list]:
    """Seconds to deliver ``steps`` batches to the device as the trainer's loop gets them, from the start of
    the loader (so nothing is prepared before the clock starts), and (``keep_labels``) their labels."""
    sharding = batch_sharding(mesh)
    local = batch // process_count

    def place(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(sharding, v, (local,) + v.shape[1:])
                for k, v in host.items()}

    labels = []
    begin = time.perf_counter()
    host = dataset.batches(start, batch, 0, process_index, process_count)
    with DeviceBatches(host if draw else Moments(host), place, 2) as batches:
        for _ in range(steps):
            _, placed = next(batches)
            jax.block_until_ready(placed)
            if keep_labels:
                labels.append(np.asarray(placed["label"]))
        seconds = time.perf_counter() - begin
    return seconds, labels


def read_part(args: tuple[str, int, int, int, int]) -> dict[str, Any]:
    """One process of the simulated run (a fresh interpreter): its rows of ``steps`` steps, timed."""
    root, batch, steps, process_index, process_count = args
    dataset = open_synthetic(root, 1)
    mesh = make_mesh(devices=jax.local_devices()[:1])
    deliver(dataset, 0, 1, batch, False, mesh, process_index, process_count)   # compiles, opens the first shard
    seconds, labels = deliver(dataset, 0, steps, batch, False, mesh, process_index, process_count, True)
    return {"images_per_s": steps * batch / process_count / seconds, "labels": labels,
            "shards_opened": len(dataset.opened_shards), "shards": len(read_index(root)["shards"])}


def simulate_processes(root: str, batch: int, processes: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``processes`` processes at once, each reading its rows for one epoch of every stream; checks that
    their rows are disjoint, make up each global batch, and cover the epoch."""
    dataset = open_synthetic(root, 1)
    n, streams = len(dataset), dataset.streams_for(batch)
    per = batch // streams
    smallest = n // streams
    steps = -(-smallest // per) + 1          # every stream through its epoch (and one step more)
    log(f"simulated run: {processes} processes at once, {steps} steps of {batch // processes} rows each "
        f"({streams} streams of {smallest}–{-(-n // streams)} examples)")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(read_part, [(root, batch, steps, p, processes) for p in range(processes)]))
    delivered = [np.concatenate([p["labels"][s] for p in parts]) for s in range(steps)]
    whole = all(np.array_equal(delivered[s], dataset.labels[dataset.indices(s, batch, 0)]) for s in range(steps))
    within = smallest // per                   # steps in which every stream is still in its first epoch
    disjoint = len(set.union(*[set(np.concatenate(p["labels"][:within]).tolist()) for p in parts])) == within * batch
    return {"processes": processes, "steps": steps, "per_process_images_per_s": [round(p["images_per_s"]) for p in parts],
            "shards_opened": [p["shards_opened"] for p in parts], "shards": parts[0]["shards"],
            "rows_disjoint": bool(disjoint), "rows_make_the_global_batch": bool(whole),
            "epoch_covered": bool(np.array_equal(np.unique(np.concatenate(delivered)), np.arange(n))),
            "no_repeat_within_epoch": bool(len(np.unique(np.concatenate(delivered[:within]))) == within * batch)}


def run(options: LoaderOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The loader benchmark the options describe; the last line logged is its JSON."""
    with tempfile.TemporaryDirectory(prefix="kindjax-loader-") as tmp:
        root = options.dir or os.path.join(tmp, "latents")
        synthetic_latents(root, options.images, options.dtype, log)
        device = jax.local_devices()[0]
        mesh = make_mesh(devices=[device])
        log(f"kindjax bench --suite loader: {options.images} latents {LATENT_SHAPE}×2 views ({options.dtype}), "
            f"batch {options.batch}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
            f"device {device.platform}")
        variants = {f"{what}_{w}_worker{'s' * (w > 1)}": (w, what == "drawn")
                    for what in ("placed", "drawn") for w in (1, 2)}
        datasets = {w: open_synthetic(root, w) for w in (1, 2)}
        for workers, draw in variants.values():   # compile the placement and the draw once
            deliver(datasets[workers], 0, 2, options.batch, draw, mesh)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(options.rounds):
            for i, (name, (workers, draw)) in enumerate(variants.items()):
                start = (r * len(variants) + i) * (options.steps + 4)   # fresh steps: no cache of the last round
                seconds, _ = deliver(datasets[workers], start, options.steps, options.batch, draw, mesh)
                rates[name].append(options.steps * options.batch / seconds)
            log(f"  round {r + 1}/{options.rounds}: " + ", ".join(f"{n} {v[-1]:,.0f}/s" for n, v in rates.items()))
        result: dict[str, Any] = {"suite": "loader", "images": options.images, "dtype": options.dtype,
                                  "batch": options.batch, "cpu_cores": os.cpu_count(),
                                  "load_average": os.getloadavg()[0], "device": device.platform}
        result["images_per_s"] = {name: round(statistics.median(v)) for name, v in rates.items()}
        if options.processes > 1:
            result["simulated"] = simulate_processes(root, options.batch, options.processes, log)
    log(json.dumps(result))
    return result
