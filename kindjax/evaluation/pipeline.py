"""ADM-style evaluation of a trained model, the work of

    python -m kindjax.evaluation --config CONFIG --run RUN [--step S] [--out DIR]

Started by a launcher on several hosts (as ``launch/`` starts training), every process runs the same
command: sampling and feature extraction are split over all devices, process 0 writes the files.
They go to ``DIR``: the folder ``--out`` names, or else the training run ``RUN`` itself.

1. Restores the EMA weights of the latest checkpoint in ``RUN`` (or step ``S``).
2. Samples ``eval.num_samples`` images with ``config.sample`` (sampler, steps, CFG scale), class
   labels by ``eval.labels`` (:func:`sample_labels`: drawn uniformly, as DiT's ``sample_ddp.py``, or
   balanced ``i mod num_classes``), noise and labels from ``eval.seed``; latent models (``data.name="latents"``, or 4 channels) are decoded with the SD-VAE of
   ``vae.weights`` (``x = D(z / vae.scale)``). Samples are rounded to uint8 (``round(127.5·(x+1))``),
   grey images repeated to RGB, and written as ADM's sample batch
   ``DIR/samples_<step>_<N>x<H>x<W>x3.npz`` (``arr_0`` images, ``arr_1`` labels); a rerun with the
   same sampling settings reuses that file.
3. Computes the chosen metrics of the needs offered here (:data:`OFFERED`; ``eval.metrics``, by default
   FID, sFID, Inception Score, precision and recall, and FDD when ``eval.dinov2_weights`` is set:
   :mod:`kindjax.evaluation.metrics`). Inception features (``eval.inception_weights``, inputs resized
   by ``eval.inception_preprocess``) of the samples are compared with ``eval.reference``, an ADM
   reference batch: its ``mu, sigma, mu_s, sigma_s`` when present (computed with the preprocessing the
   file records, else with ADM's evaluator's, ``"tf1"``: another setting is refused before sampling),
   otherwise statistics of its images ``arr_0``; precision/recall need the images. DINOv2 features are
   those of the network ``eval.dinov2_model`` names (default ViT-L/14, dgm-eval's), on the samples and
   the reference images, normalised by ``eval.fdd_normalize`` (:func:`kindjax.evaluation.dinov2.fdd`).
4. Writes ``DIR/eval_<step>.json`` (metrics, step, files, config), the Inception features of the samples
   and of the reference when they were computed (``features_<step>.npz``, ``reference_features_<step>.npz``,
   each recording its Inception preprocessing: pooled metrics over runs, :mod:`kindjax.evaluation.pooled`)
   and ``eval/<metric>`` scalars to
   ``DIR/tensorboard``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kindjax import checkpoints
from kindjax.config import ConfigError, validate
from kindjax.diffusion import GaussianDiffusion
from kindjax.evaluation import adm
from kindjax.evaluation.inception import PREPROCESSING, inception_features, load_inception
from kindjax.evaluation.metric import to_rgb_uint8
from kindjax.evaluation.metrics import METRICS, Inputs, Samples, chosen_metrics, compute_metrics, needs_of
from kindjax.evaluation.pooled import save_features
from kindjax.models.dit import abstract_params, build_model
from kindjax.diffusion.generate import generate
from kindjax import sharding
from kindjax.io.logs import RunLogger
from kindjax.io.paths import as_path, read_json, write_json

PROGRESS_UPDATES = 20  # sampling is split into about this many chunks, each reported
LATENT_FACTOR = 8      # image side / latent side of the SD-VAE (names the sample file before decoding)
#: The needs of metrics (:data:`kindjax.evaluation.metric.NEEDS`) computed here.
OFFERED = ("samples", "inception", "dinov2")
#: The needs that read the reference batch ``eval.reference``.
REFERENCE_NEEDS = {"inception", "dinov2"}


def is_latent_model(config: ml_collections.ConfigDict) -> bool:
    """Samples are SD-VAE latents: ``data.name="latents"``, or channels that are not grey/RGB
    (the ImageNet configs: 4 latent channels)."""
    return config.data.name == "latents" or config.model.in_channels not in (1, 3)


def pipeline_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The chosen metrics computed here (of the needs :data:`OFFERED`); refuses a choice of none."""
    names = chosen_metrics(config, OFFERED)
    if not names:
        elsewhere = {n: sorted(set(METRICS[n].needs) - set(OFFERED)) for n in config.eval.metrics}
        raise ConfigError(f"eval.metrics={tuple(config.eval.metrics)}: none is computed by python -m kindjax.evaluation, "
                          f"which offers {list(OFFERED)} (needs of the chosen ones it lacks: {elsewhere}; those are "
                          f"computed at the end of training); name a metric of Inception or DINOv2 features or of "
                          f"the samples, e.g. --config.eval.metrics=\"('fid', 'sfid')\"")
    return names


def check_eval_config(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], set[str]]:
    """Everything that can be checked before sampling; returns the metrics computed here and the
    reference batch's keys (none when no chosen metric reads it)."""
    e = config.eval
    names = pipeline_metrics(config)
    needs = needs_of(names)
    if is_latent_model(config) and not config.vae.weights:
        raise ConfigError(f"the samples of this latent model (data.name={config.data.name!r}, model.in_channels="
                          f"{config.model.in_channels}) are decoded to images by the SD-VAE: set vae.weights")
    if not needs & REFERENCE_NEEDS:
        return names, set()
    if not e.reference:
        raise ConfigError("eval.reference is not set: give an ADM reference batch .npz (images arr_0 and/or "
                          "mu, sigma, mu_s, sigma_s), e.g. VIRTUAL_imagenet256_labeled.npz")
    if "inception" in needs:
        if not e.inception_weights or not as_path(e.inception_weights).is_file():
            raise ConfigError(f"eval.inception_weights={e.inception_weights!r} is not a file: give pytorch-fid's "
                              f"pt_inception-2015-12-05-6726825d.pth (or the .npz of kindjax.evaluation.inception)")
        if e.inception_preprocess not in PREPROCESSING:
            raise ConfigError(f"eval.inception_preprocess={e.inception_preprocess!r}: use one of {PREPROCESSING}")
    if e.num_samples < 4:
        raise ConfigError(f"eval.num_samples={e.num_samples}: need at least 4 (precision/recall use the "
                          f"3 nearest neighbours)")
    try:
        keys = adm.reference_keys(e.reference)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"eval.reference: {err}") from None
    stats = adm.stats_preprocessing(e.reference) if "inception" in needs else None
    if stats not in (None, e.inception_preprocess):
        raise ConfigError(f"eval.reference {e.reference} holds Inception statistics of the {stats!r} preprocessing "
                          f"but eval.inception_preprocess={e.inception_preprocess!r}: set "
                          f"eval.inception_preprocess={stats!r}, or give a reference of images only (arr_0)")
    if "dinov2" in needs:
        dino = [n for n in names if "dinov2" in METRICS[n].needs]
        if not e.dinov2_weights:
            raise ConfigError(f"eval.metrics chooses {dino} (DINOv2 features) but eval.dinov2_weights is not set: give "
                              f"a Hugging Face DINOv2 directory, or leave {dino} out")
        if "arr_0" not in keys:
            raise ConfigError(f"eval.dinov2_weights is set but {e.reference} holds no images (arr_0) to compute "
                              f"the reference DINOv2 features of {dino} from; unset eval.dinov2_weights or give "
                              f"a reference batch with images")
        from kindjax.evaluation.dinov2 import read_dinov2_config

        try:   # before any sampling: the weights are the DINOv2 eval.dinov2_model names
            read_dinov2_config(e.dinov2_weights, model=e.dinov2_model)
        except FileNotFoundError as err:
            raise ConfigError(f"eval.dinov2_weights: {err}") from None
    return names, keys


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                       step: int | None = None) -> tuple[Any, int]:
    """The EMA parameters of checkpoint ``step`` (default: the latest) in ``workdir``, sharded
    over ``mesh`` as in training; refuses a checkpoint of another model config."""
    abstract = abstract_params(build_model(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, sharding.state_shardings(mesh, abstract))
    return checkpoints.restore_state_item(workdir, "ema_params", target, config, step)


def latent_decoder(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable[[np.ndarray], np.ndarray]:
    """Latents (as trained: ``vae.scale · z``) → images in [-1, 1]: ``D(latents / vae.scale)``."""
    from kindjax.models.vae import AutoencoderKL, load_vae

    vae = load_vae(config.vae.weights, config.vae.compute_dtype)
    rows = sharding.batch_sharding(mesh)
    decode = jax.jit(lambda p, z: vae.model.apply({"params": p}, z / config.vae.scale, method=AutoencoderKL.decode),
                     in_shardings=(sharding.replicated(mesh), rows), out_shardings=rows)
    vae_params = jax.device_put(vae.params, sharding.replicated(mesh))

    def run(latents: np.ndarray) -> np.ndarray:
        return sharding.map_batches(lambda z, _: decode(vae_params, z), latents, config.eval.batch_size, mesh)

    return run


def sample_labels(rule: str, n: int, num_classes: int, seed: int) -> np.ndarray:
    """The ``n`` class labels of the evaluation samples (``eval.labels``): ``"uniform"``, i.i.d. uniform
    on ``0..num_classes-1`` from ``numpy.random.default_rng(seed)`` (DiT's ``sample_ddp.py`` draws
    ``torch.randint(0, num_classes, …)``); ``"balanced"``, ``i mod num_classes``."""
    if rule == "uniform":
        return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)
    if rule == "balanced":
        return (np.arange(n) % num_classes).astype(np.int32)
    raise ConfigError(f"eval.labels={rule!r}: use 'uniform' or 'balanced'")


def sample_batch(config: ml_collections.ConfigDict, params: Any, mesh: Mesh,
                 log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """``eval.num_samples`` uint8 RGB samples with the labels of :func:`sample_labels`, in chunks
    (chunk ``c`` uses the key ``fold_in(key(eval.seed), c)``), progress reported per chunk."""
    model = build_model(config)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    decode = latent_decoder(config, mesh) if is_latent_model(config) else None
    n, batch = config.eval.num_samples, config.eval.batch_size
    labels = sample_labels(config.eval.labels, n, model.num_classes, config.eval.seed)
    chunk = batch * max(1, -(-n // (PROGRESS_UPDATES * batch)))
    key = jax.random.key(config.eval.seed)
    images, start_time = [], time.time()
    for c, start in enumerate(range(0, n, chunk)):
        out = generate(model, params, diffusion, jax.random.fold_in(key, c), labels[start:start + chunk],
                       config.sample, batch, mesh)
        images.append(to_rgb_uint8(decode(out) if decode is not None else out))
        done, elapsed = min(start + chunk, n), time.time() - start_time
        log(f"sampled {done}/{n} ({100 * done / n:.0f}%), {done / elapsed:.2f} images/s, "
            f"{(n - done) * elapsed / done / 60:.1f} min left")
    return np.concatenate(images), labels


def _sampling_settings(config: ml_collections.ConfigDict, step: int) -> dict:
    c = checkpoints.config_json(config)
    return {"step": step, "num_samples": config.eval.num_samples, "seed": config.eval.seed, "labels": config.eval.labels,
            "sample": c["sample"], "diffusion": c["diffusion"], "model": c["model"],
            "vae": c["vae"] if is_latent_model(config) else None}


def samples_for_step(config: ml_collections.ConfigDict, out: str, step: int, params: Any, mesh: Mesh,
                     log: Callable[[str], None]) -> tuple[str, np.ndarray, np.ndarray]:
    """The ADM sample batch of ``step`` in folder ``out`` (path, uint8 RGB images, labels): reused when a
    file written with the same sampling settings exists (its ``.json`` beside it), sampled and written
    otherwise."""
    m = config.model
    side = m.image_size * (LATENT_FACTOR if is_latent_model(config) else 1)
    path = os.path.join(out, f"samples_{step}_{config.eval.num_samples}x{side}x{side}x3.npz")
    settings_path = path[:-len(".npz")] + ".json"
    settings = _sampling_settings(config, step)
    if as_path(path).is_file() and as_path(settings_path).is_file() and read_json(settings_path) == settings:
        log(f"Reusing the samples in {path}")
        with as_path(path).open("rb") as f, np.load(f) as batch:
            return path, batch["arr_0"], batch["arr_1"]
    images, labels = sample_batch(config, params, mesh, log)
    if jax.process_index() == 0:
        with as_path(path + ".tmp").open("wb") as f:
            adm.write_sample_batch(f, images, labels)
        as_path(path + ".tmp").replace(as_path(path))
        write_json(settings_path, settings)
    log(f"Wrote {len(images)} samples to {path}")
    return path, images, labels


def feature_inputs(config: ml_collections.ConfigDict, needs: set[str], images: np.ndarray, mesh: Mesh,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """The ``inception`` (:class:`kindjax.evaluation.adm.InceptionFeatures`) and ``dinov2``
    (:class:`kindjax.evaluation.dinov2.DinoFeatures`) inputs among ``needs``: features of the uint8 RGB
    samples ``images`` and of the reference batch ``eval.reference``, progress reported to ``log``."""
    e = config.eval
    inputs: dict[str, Any] = {}
    if not needs & REFERENCE_NEEDS:
        return inputs
    reference = adm.read_reference(e.reference)

    def progress(network: str, what: str, total: int) -> Callable[[int, int], None]:
        """Reports about PROGRESS_UPDATES times over ``total`` images."""
        every = max(1, total // (PROGRESS_UPDATES * e.inception_batch_size)) * e.inception_batch_size

        def report(done: int, total: int) -> None:
            if done % every < e.inception_batch_size or done == total:
                log(f"{network} features of the {what}: {done}/{total}")

        return report

    if "inception" in needs:
        module, variables = load_inception(e.inception_weights)
        module = module.clone(dtype=jax.numpy.dtype(e.feature_dtype))

        def features(pixels: np.ndarray, what: str) -> dict[str, np.ndarray]:
            return inception_features(module, variables, pixels, e.inception_batch_size, e.inception_preprocess,
                                      mesh, progress("Inception", what, len(pixels)))

        own = features(images, "samples")
        ref = features(reference.images, "reference") if reference.images is not None else None
        inputs["inception"] = adm.InceptionFeatures(
            own, reference.stats if reference.stats is not None else adm.statistics(ref), ref)
    if "dinov2" in needs:
        from kindjax.evaluation.dinov2 import DinoFeatures, dinov2_features, load_dinov2

        dino, dino_params = load_dinov2(e.dinov2_weights, model=e.dinov2_model)
        dino = dino.clone(dtype=jax.numpy.dtype(e.feature_dtype))
        inputs["dinov2"] = DinoFeatures(*(dinov2_features(dino, dino_params, pixels, e.inception_batch_size, mesh,
                                                          progress("DINOv2", what, len(pixels)))
                                          for pixels, what in ((images, "samples"), (reference.images, "reference"))),
                                        normalize=e.fdd_normalize)
    return inputs


def evaluate(config: ml_collections.ConfigDict, run: str, step: int | None = None, out: str = "") -> dict[str, float]:
    """Samples from the EMA weights of the training run ``run``'s checkpoint and scores them (module
    doc); returns the metrics, also written to ``DIR/eval_<step>.json`` and TensorBoard, ``DIR`` being
    ``out`` or else the run itself."""
    validate(config, jax.device_count())
    names, reference_keys = check_eval_config(config)
    needs = needs_of(names)
    e = config.eval
    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    params, step = restore_ema_params(config, run, mesh, step)
    out = out or run
    logger = RunLogger(out, config.train.num_steps)
    try:
        elsewhere = [n for n in e.metrics if n not in names]
        logger.text(f"Evaluating {run} at step {step}: {e.num_samples} samples, {config.sample.sampler} "
                    f"{config.sample.num_steps} steps, CFG scale {config.sample.cfg_scale}; {', '.join(names)}"
                    + (f" ({', '.join(elsewhere)}: at the end of training, not here)." if elsewhere else "."))
        samples_path, images, labels = samples_for_step(config, out, step, params, mesh, logger.text)
        inputs = {"samples": Samples(labels, pixels=images), **feature_inputs(config, needs, images, mesh, logger.text)}
        metrics = compute_metrics(names, Inputs(**inputs))
        inception = inputs.get("inception")
        skipped = [n for n in names if n not in metrics]
        if skipped:
            why = f" ({e.reference} holds statistics but no images)" \
                if inception is not None and inception.reference is None else ""
            logger.text(f"{' and '.join(skipped)} are skipped: these inputs cannot give them{why}.")
        kept = {"features": None, "reference_features": None}   # for pooled metrics (evaluation.pooled)
        if inception is not None:
            for key, features in (("features", inception.samples), ("reference_features", inception.reference)):
                if features is not None:
                    kept[key] = str(as_path(out) / f"{key}_{step}.npz")
                    if jax.process_index() == 0:
                        save_features(kept[key], features, e.inception_preprocess)
        reads_reference = bool(needs & REFERENCE_NEEDS)
        report = {"step": step, "metrics": metrics, "num_samples": len(images), "samples": samples_path, **kept,
                  "reference": str(as_path(e.reference)) if reads_reference else None,
                  "reference_keys": sorted(reference_keys),
                  "inception_weights": str(as_path(e.inception_weights)) if inception is not None else None,
                  "inception_preprocess": e.inception_preprocess if inception is not None else None,
                  "labels": e.labels,
                  "dinov2": {"weights": str(as_path(e.dinov2_weights)), "model": e.dinov2_model,
                             "normalize": e.fdd_normalize}
                  if "dinov2" in needs else None,
                  "config": checkpoints.config_json(config)}
        if jax.process_index() == 0:
            write_json(as_path(out) / f"eval_{step}.json", report)
        logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    finally:
        logger.close()
    return metrics
