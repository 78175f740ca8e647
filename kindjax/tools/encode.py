"""Encode an image source to SD-VAE posterior moments, once, for latent-space training.

    python -m kindjax.tools.encode --config CONFIG --vae VAE_DIR --out LATENT_DIR [--dtype float16] [--config.KEY=VALUE ...]

The images come from ``kindjax.data.open_image_source(config)`` with every class of
the source kept (``data.grouping``, ``data.task`` and ``data.classes`` select classes when
training on the latents, so one encode serves every selection); ``--vae`` (or
``config.vae.weights``) is a diffusers ``AutoencoderKL`` directory.  Each image x ∈ [-1, 1]
is encoded to q(z|x) = N(mean, std²) and the moments are kept, so training draws a fresh
z = mean + std·ε every step; with ``config.vae.flips`` the mirrored image's moments are kept
too and training picks one view per example.  ``--dtype`` (``config.vae.dtype``, default float16:
half of float32's disk; bfloat16; float32) is the precision the moments are stored at.  Rerunning the
same command resumes and repairs: a shard is kept only when its JSON exists, its ``.npy`` files
match it (header and size), its moments were finite and its labels are classes of the plan; a
missing, truncated, wrong-shape, non-finite or mislabelled shard is encoded again, and so is every
shard ``--redo`` names (damage only a read finds, such as NaN written into a shard after its encode).

Output directory:

- ``encode.json``: the plan (source size, shard size, views, dtype, VAE, source); a rerun must match
  it; it also keeps the invocation of the latest run (working directory, config file, ``--config.*``
  overrides, VAE, dtype), from which the loader's errors build the repair;
- ``shard_NNNNN.moments.npy``: ``(n, views, 2, h, w, c)`` in the plan's dtype (bfloat16 as its uint16
  bits); axis 2 is (mean, std), view 0 the image and view 1 its horizontal mirror;
- ``shard_NNNNN.labels.npy``: int32 ``(n,)``;
- ``shard_NNNNN.json``: ``count``, ``skipped`` (source indices of unreadable images), shapes, ``dtype``,
  ``finite`` (no NaN/Inf among the stored moments); written last, it marks the shard finished;
- ``index.json``: written once every shard is finished and verifies (read by :mod:`kindjax.data.latents`).

Shard k holds the readable images among source indices ``[k·S, (k+1)·S)``, S = ``vae.shard_size``.
The encode is jitted with the batch split over a mesh of the local devices; several
processes (a TPU pod, SLURM) split the shards (k ≡ process index mod process count).
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kindjax import cli
from kindjax.config import ConfigError
from kindjax.data import ImageSource, open_image_source
from kindjax.data.latents import INDEX_FORMAT, INDEX_NAME, MOMENT_DTYPES, PLAN_NAME, shard_problem
from kindjax.distributed import initialize
from kindjax.models.vae import AutoencoderKL, PretrainedVAE, load_vae
from kindjax.io.paths import as_path, load_npy, read_json
from kindjax.sharding import batch_sharding, make_mesh, replicated

def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def make_encode_fn(vae: PretrainedVAE, mesh: Mesh, flips: bool) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images (B, S, S, 3) → float32 moments (B, views, 2, h, w, c), B split over ``mesh``.

    x = u/127.5 − 1; (mean, logvar) = encode(x); std = exp(logvar / 2); view 1 encodes x[:, :, ::-1].
    """
    params = jax.device_put(vae.params, replicated(mesh))
    rows = batch_sharding(mesh)

    @jax.jit
    def encode(p: Any, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 127.5 - 1.0
        views = [x, x[:, :, ::-1]] if flips else [x]
        mean, logvar = vae.model.apply({"params": p}, jnp.concatenate(views), method=AutoencoderKL.encode)
        moments = jnp.stack([mean, jnp.exp(0.5 * logvar)], axis=1)           # (V·B, 2, h, w, c)
        moments = moments.reshape((len(views), x.shape[0]) + moments.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(moments, 0, 1), rows)

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(encode(params, jax.device_put(images, rows)))

    return run


def _save(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes ``path`` (local or cloud) atomically (temporary file, then rename)."""
    tmp = as_path(path + ".tmp")
    with tmp.open(mode) as f:
        write(f)
    tmp.replace(as_path(path))


def _save_json(path: str, obj: dict) -> None:
    _save(path, lambda f: f.write(json.dumps(obj, indent=1)), mode="w")


def _read_batches(source: ImageSource, indices: Sequence[int], batch_size: int,
                  pool: concurrent.futures.Executor) -> Iterator[list[tuple[int, np.ndarray | None]]]:
    """``(index, image)`` lists of ``batch_size``, read by ``pool`` up to two batches ahead of the consumer."""
    pending: collections.deque = collections.deque()
    for lo in range(0, len(indices), batch_size):
        chunk = indices[lo:lo + batch_size]
        pending.append([(i, pool.submit(source.image, i)) for i in chunk])
        if len(pending) > 2:
            yield [(i, f.result()) for i, f in pending.popleft()]
    while pending:
        yield [(i, f.result()) for i, f in pending.popleft()]


def _check_image(index: int, image: np.ndarray, shape: tuple[int, ...] | None) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image source returned {image.dtype} {image.shape} for index {index}; "
                         f"expected uint8 (S, S, 3)")
    if shape is not None and image.shape != shape:
        raise ValueError(f"image {index} has shape {image.shape}, earlier images {shape}; the source "
                         f"must give one size (center crops)")


def encode_shard(source: ImageSource, encode: Callable[[np.ndarray], np.ndarray], lo: int, hi: int,
                 batch_size: int, pool: concurrent.futures.Executor
                 ) -> tuple[np.ndarray, np.ndarray, list[int], tuple[int, ...] | None]:
    """Moments and labels of the readable images among source indices [lo, hi), the skipped
    indices, and the image shape (None when no image was readable).

    Every device call has ``batch_size`` rows (a short last batch is zero-padded, the padding dropped).
    """
    moments, labels, skipped, shape = [], [], [], None
    for batch in _read_batches(source, range(lo, hi), batch_size, pool):
        kept = [(i, im) for i, im in batch if im is not None]
        skipped += [i for i, im in batch if im is None]
        if not kept:
            continue
        for i, im in kept:
            _check_image(i, im, shape)
            shape = im.shape
        images = np.zeros((batch_size,) + shape, np.uint8)
        images[:len(kept)] = np.stack([im for _, im in kept])
        moments.append(encode(images)[:len(kept)])
        labels += [int(source.label(i)) for i, _ in kept]
    if not moments:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int32), skipped, None
    return np.concatenate(moments), np.asarray(labels, np.int32), skipped, shape


def stored_moments(moments: np.ndarray, dtype: str) -> np.ndarray:
    """float32 moments as stored at ``dtype`` (bfloat16: its uint16 bits, since ``.npy`` has no bfloat16)."""
    cast = moments.astype(MOMENT_DTYPES[dtype])
    return cast.view(np.uint16) if dtype == "bfloat16" else cast


def _plan(source: ImageSource, vae: PretrainedVAE, shard_size: int, flips: bool, source_info: dict,
          dtype: str) -> dict:
    return json.loads(json.dumps(dict(
        format=INDEX_FORMAT, num_images=len(source), shard_size=shard_size,
        num_shards=-(-len(source) // shard_size), views=2 if flips else 1, dtype=dtype,
        num_classes=int(source.num_classes), class_names=list(source.class_names),
        vae=dict(scaling_factor=vae.scaling_factor, config=vae.config), vae_path=vae.path, source=source_info)))


#: Plan keys a rerun may change: where the VAE lies and how the encode was invoked.
UNPLANNED = ("vae_path", "invocation", "command")


def start_plan(out_dir: str, plan: dict) -> None:
    """Writes the plan of a new encode, or checks that the one in ``out_dir`` is the same (the VAE's
    location and the invocation may change, its config may not; a plan without ``dtype`` is float32)
    and records this run's invocation."""
    as_path(out_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out_dir, PLAN_NAME)
    if as_path(path).exists():
        old = {"dtype": "float32"} | read_json(path)
        differ = sorted(k for k in set(old) | set(plan) if k not in UNPLANNED and old.get(k) != plan.get(k))
        if differ:
            raise ConfigError(f"{out_dir} holds an encode with other settings ({', '.join(differ)} differ); "
                              f"choose a new --out, or delete {out_dir} to start over")
        plan = {k: old[k] for k in ("invocation",) if k in old} | plan
    _save_json(path, plan)


def shard_done(out_dir: str, k: int, plan: dict) -> bool:
    """Shard ``k`` is finished: its JSON exists and its ``.npy`` files match it (header and size)."""
    try:
        info = read_json(os.path.join(out_dir, shard_name(k) + ".json"))
    except (OSError, ValueError):
        return False
    if info.get("count") == 0:
        return as_path(os.path.join(out_dir, shard_name(k) + ".labels.npy")).exists()
    return shard_problem(out_dir, shard_name(k), info["count"], plan["views"], info["latent_shape"],
                         plan.get("dtype", "float32")) is None


def shard_sound(out_dir: str, k: int, plan: dict) -> bool:
    """Finished shard ``k`` holds what the loader takes: its moments were finite when encoded and its
    labels are classes of the plan (a rerun encodes it again otherwise)."""
    if read_json(os.path.join(out_dir, shard_name(k) + ".json")).get("finite") is False:
        return False
    labels = load_npy(os.path.join(out_dir, shard_name(k) + ".labels.npy"))
    return bool(((labels >= 0) & (labels < plan["num_classes"])).all())


def write_shard(out_dir: str, k: int, moments: np.ndarray, labels: np.ndarray, skipped: list[int],
                image_shape: tuple[int, ...] | None, dtype: str, log: Callable[[str], None] = print) -> None:
    """Writes shard ``k``: float32 ``moments`` stored at ``dtype``, ``labels``, then its JSON (count, skipped,
    shapes, dtype, ``finite``), which marks it finished; an old JSON is removed first."""
    prefix = os.path.join(out_dir, shard_name(k))
    if as_path(prefix + ".json").exists():   # damaged: unmark it before its files change
        as_path(prefix + ".json").unlink()
    stored = stored_moments(moments, dtype)
    finite = bool(np.isfinite(stored.view(MOMENT_DTYPES[dtype])).all())
    if not finite:
        log(f"kindjax.tools.encode: WARNING shard {k} has NaN or Inf moments at {dtype} (the VAE's output, or values "
            f"beyond {dtype}'s range); training refuses it (or skips it with data.bad_shards=skip)")
    _save(prefix + ".moments.npy", lambda f: np.save(f, stored))
    _save(prefix + ".labels.npy", lambda f: np.save(f, labels))
    _save_json(prefix + ".json", dict(count=int(labels.shape[0]), skipped=skipped,
                                      image_shape=list(image_shape) if image_shape else None,
                                      latent_shape=list(moments.shape[3:]) or None, dtype=dtype, finite=finite))


def encode_shards(source: ImageSource, vae: PretrainedVAE, out_dir: str, *, shard_size: int, batch_size: int,
                  flips: bool, source_info: dict, dtype: str = "float16", invocation: dict | None = None,
                  redo: Sequence[int] = (), mesh: Mesh | None = None, process_index: int = 0,
                  process_count: int = 1, log: Callable[[str], None] = print) -> list[int]:
    """Encodes this process's unfinished, damaged or ``redo`` shards of ``source`` into ``out_dir``
    (moments stored at ``dtype``); returns the shards it encoded.

    ``batch_size`` images per device call, split over ``mesh`` (default: all local devices);
    ``invocation``: how this run was started (working directory, config file, overrides, VAE,
    dtype), recorded in the plan, from which the loader builds the repair its errors name
    (:func:`kindjax.data.latents.repair_command`); ``redo``: shards to encode again even where their
    files check out (damage found by reading them, e.g. NaN written into a shard after its encode).
    """
    if dtype not in MOMENT_DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not a moment dtype; use one of {sorted(MOMENT_DTYPES)}")
    mesh = make_mesh(devices=jax.local_devices()) if mesh is None else mesh
    if batch_size <= 0 or batch_size % mesh.size:
        raise ConfigError(f"vae.encode_batch_size={batch_size} is not a positive multiple of the {mesh.size} "
                          f"local devices; use a multiple of {mesh.size}")
    if shard_size <= 0:
        raise ConfigError(f"vae.shard_size={shard_size} must be positive")
    plan = _plan(source, vae, shard_size, flips, source_info, dtype)
    wrong = sorted(k for k in redo if not 0 <= k < plan["num_shards"])
    if wrong:
        raise ConfigError(f"--redo={','.join(map(str, redo))}: shards {wrong} do not exist; the encode has shards "
                          f"0..{plan['num_shards'] - 1}")
    start_plan(out_dir, plan | ({"invocation": invocation} if invocation else {}))
    mine = [k for k in range(process_index, plan["num_shards"], process_count)
            if k in redo or not shard_done(out_dir, k, plan) or not shard_sound(out_dir, k, plan)]
    todo = sum(min(len(source), (k + 1) * shard_size) - k * shard_size for k in mine)
    log(f"kindjax.tools.encode: {len(mine)} shards ({todo} images) to encode into {out_dir} on {mesh.size} devices")
    encode = make_encode_fn(vae, mesh, flips)
    done, start = 0, time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        for n, k in enumerate(mine):
            lo, hi = k * shard_size, min(len(source), (k + 1) * shard_size)
            moments, labels, skipped, image_shape = encode_shard(source, encode, lo, hi, batch_size, pool)
            write_shard(out_dir, k, moments, labels, skipped, image_shape, dtype, log)
            done += hi - lo
            rate = done / max(time.time() - start, 1e-9)
            log(f"kindjax.tools.encode: shard {k + 1}/{plan['num_shards']} ({n + 1}/{len(mine)} here): "
                f"{labels.shape[0]} encoded, {len(skipped)} skipped; {rate:.1f} images/s, "
                f"~{(todo - done) / max(rate, 1e-9) / 60:.1f} min left")
    return mine


def write_index(out_dir: str) -> dict:
    """Writes ``index.json`` from the plan and the finished shards (all must be finished and verify:
    :func:`shard_done`); returns it."""
    plan = {"dtype": "float32"} | read_json(os.path.join(out_dir, PLAN_NAME))
    shards, skipped, latent_shape, image_shape = [], [], None, None
    for k in range(plan["num_shards"]):
        if not shard_done(out_dir, k, plan):
            raise ConfigError(f"shard {k} of {out_dir} is not finished or is damaged (its .npy files do not "
                              f"match {shard_name(k)}.json); rerun the encode to encode it")
        info = read_json(os.path.join(out_dir, shard_name(k) + ".json"))
        shards.append(dict(name=shard_name(k), count=info["count"], finite=info.get("finite", True)))
        skipped += info["skipped"]
        if info["latent_shape"] is not None:
            if latent_shape not in (None, info["latent_shape"]):
                raise RuntimeError(f"shard {k} has latents {info['latent_shape']}, earlier shards {latent_shape}")
            latent_shape, image_shape = info["latent_shape"], info["image_shape"]
    if latent_shape is None:
        raise RuntimeError(f"no image of the source could be read ({len(skipped)} skipped); nothing to index")
    index = dict(
        format=INDEX_FORMAT, num_examples=sum(s["count"] for s in shards), latent_shape=latent_shape,
        image_shape=image_shape, dtype=plan["dtype"],
        views=plan["views"], moments_layout="(n, views, [mean, std], h, w, c); view 1 = horizontal mirror",
        num_classes=plan["num_classes"], class_names=plan["class_names"], shards=shards,
        skipped=dict(count=len(skipped), indices=skipped),
        scale=plan["vae"]["scaling_factor"], vae=dict(plan["vae"], path=plan["vae_path"]), source=plan["source"],
        num_images=plan["num_images"])
    _save_json(os.path.join(out_dir, INDEX_NAME), index)
    return index


def encode(config: Any, vae_path: str, out_dir: str, dtype: str = "", invocation: dict | None = None,
           redo: Sequence[int] = (), log: Callable[[str], None] = print) -> dict | None:
    """The whole command: encodes this process's shards at ``dtype`` (default ``config.vae.dtype``;
    ``invocation`` and ``redo`` as in :func:`encode_shards`); process 0 then writes and returns the index."""
    path = vae_path or config.vae.weights
    if not path:
        raise ConfigError("no VAE given: pass --vae DIR (a diffusers AutoencoderKL directory, e.g. a local "
                          "snapshot of stabilityai/sd-vae-ft-ema) or set config.vae.weights")
    try:
        vae = load_vae(path, config.vae.compute_dtype)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    source_config = config.copy_and_resolve_references()
    source_config.data.update(grouping="", task="", classes=())
    log("kindjax.tools.encode: encoding every class of the source; data.grouping/task/classes select classes "
        "when training on the latents")
    source = open_image_source(source_config)
    encode_shards(source, vae, out_dir, shard_size=config.vae.shard_size,
                  batch_size=config.vae.encode_batch_size, flips=config.vae.flips,
                  source_info=source_config.data.to_dict(), dtype=dtype or config.vae.dtype,
                  invocation=invocation and {**invocation, "vae": path}, redo=redo, process_index=jax.process_index(),
                  process_count=jax.process_count(), log=log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("kindjax.tools.encode: shards finished")
    if jax.process_index() != 0:
        return None
    index = write_index(out_dir)
    log(f"kindjax.tools.encode: {index['num_examples']} latents {tuple(index['latent_shape'])} × {index['views']} views "
        f"in {len(index['shards'])} shards, {index['skipped']['count']} unreadable images skipped → {out_dir}")
    return index


def main(argv: list[str]) -> None:
    """Encodes the images of ``--config`` with ``--vae`` into ``--out``."""
    del argv
    initialize()
    f = flags.FLAGS
    try:
        redo = sorted({int(k) for k in f.redo or ()})
    except ValueError:
        raise ConfigError(f"--redo={','.join(f.redo)}: give shard numbers, e.g. --redo=3,7") from None
    invocation = {"cwd": os.getcwd(), "config": f["config"].config_filename, "dtype": f.dtype,
                  "overrides": [a for a in sys.argv[1:] if a.startswith("--config.") and "=" in a]}
    encode(f.config, f.vae, f.out, f.dtype, invocation=invocation, redo=redo)


if __name__ == "__main__":
    cli.define_config("Config file (configs/*.py): data source and vae section.")
    flags.DEFINE_string("vae", "", "diffusers AutoencoderKL directory (overrides config.vae.weights).")
    flags.DEFINE_string("out", None, "Directory for the latent shards and index.json.")
    flags.DEFINE_enum("dtype", "", ["", "float16", "bfloat16", "float32"],
                      "Stored precision of the moments (default config.vae.dtype, float16).")
    flags.DEFINE_list("redo", None, "Shard numbers to encode again even where their files check out (the loader "
                      "names them: damage found by reading a shard).")
    flags.mark_flags_as_required(["config", "out"])
    cli.run(main)
