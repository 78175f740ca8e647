"""KIND's learngene analysis (Table 5 and Figure 7 of the KIND paper), one command:

    python -m kindjax.papers.kind.analyze --run KIND_RUN [--dense_run DENSE_RUN] --out DIR [--num_samples 500]

samples ``--num_samples`` images (labels balanced over the training classes, EMA weights, the
checkpoint's sampler) from the KIND model with and without its tailors and from the dense
pre-trained model, classifies them (the digits evaluator for the digits, else the FID
Inception of ``eval.inception_weights``; latents decoded by ``vae.weights``), and writes
``DIR/table5.md`` / ``table5.json`` (entropy, variance, kurtosis of the predicted class
distributions, with the raw images of the training classes as a row) and ``DIR/figure7.png``
(rows: classes; columns: per seed, with and without tailors).  The reading of the table's
undefined statistics is in :mod:`kindjax.papers.kind.diversion`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import flags

from kindjax import cli, sharding
from kindjax.diffusion import GaussianDiffusion
from kindjax.evaluation import adm
from kindjax.papers.kind.diversion import MODES, diversion_table, figure_grid, learngene_only, prediction_statistics
from kindjax.evaluation.pipeline import is_latent_model, latent_decoder, to_rgb_uint8
from kindjax.checkpoints.learngene import load_params
from kindjax.io.logs import image_grid, png_bytes
from kindjax.models.dit import build_model
from kindjax.io.paths import as_path, write_bytes, write_json
from kindjax.diffusion.generate import generate

#: Classes shown in Figure 7 (the paper: 12 superclasses).
FIGURE_CLASSES = 12


def _sampler(config: ml_collections.ConfigDict, mesh: Any) -> Callable[[Any, np.ndarray, int], np.ndarray]:
    """``(params, labels, seed) → uint8 RGB images`` with the config's model, sampler and decoder."""
    model, diffusion = build_model(config), GaussianDiffusion.from_config(config.diffusion)
    decode = latent_decoder(config, mesh) if is_latent_model(config) else None

    def sample(params: Any, labels: np.ndarray, seed: int) -> np.ndarray:
        out = generate(model, params, diffusion, jax.random.key(seed), labels, config.sample,
                       config.eval.batch_size, mesh)
        return to_rgb_uint8(decode(out) if decode is not None else out)

    return sample


def _classifier(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """``uint8 RGB images → class probabilities`` and its name: the digits evaluator (all ten
    digits) for the digits, else the FID Inception's softmax over its 1008 logits."""
    if config.data.name == "digits":
        from kindjax.evaluation.digits_evaluator import evaluator

        digits = evaluator()
        return (lambda images: digits.probabilities(images[..., :1].astype(np.float32) / 127.5 - 1.0),
                "digits evaluator (10 classes)")
    from kindjax.evaluation.inception import inception_features, load_inception

    module, variables = load_inception(config.eval.inception_weights)

    def probabilities(images: np.ndarray) -> np.ndarray:
        logits = inception_features(module, variables, images, config.eval.inception_batch_size,
                                    config.eval.inception_preprocess, mesh)["logits_unbiased"]
        return np.asarray(jax.nn.softmax(np.asarray(logits, np.float64), axis=-1))

    return probabilities, "FID Inception (1008 logits)"


def _raw_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray | None:
    """Real images of the training classes: the digits, or ``eval.reference``'s ``arr_0``."""
    if config.data.name == "digits":
        from kindjax.data.digits import load_digits

        images = load_digits(tuple(config.data.classes)).images[:n]
        return to_rgb_uint8(images)
    if config.eval.reference:
        images = adm.read_reference(config.eval.reference).images
        return None if images is None else images[:n]
    return None


def analyze(kind_workdir: str, out: str, dense_workdir: str = "", samples: int = 500, mode: str = MODES[0],
            seeds: tuple[int, ...] = (0, 1), log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Writes Table 5 and Figure 7 for the KIND run in ``kind_workdir``; returns the table's rows."""
    kind_params, config = load_params(kind_workdir)
    mesh = sharding.make_mesh()
    sample = _sampler(config, mesh)
    classify, classifier = _classifier(config, mesh)
    n_classes = config.model.num_classes
    labels = (np.arange(samples) % n_classes).astype(np.int32)
    rows: dict[str, np.ndarray] = {}
    raw = _raw_images(config, samples)
    if raw is not None:
        rows["raw images of the training classes"] = classify(raw)
    if dense_workdir:
        dense_params, dense_config = load_params(dense_workdir)
        log(f"sampling {samples} images from the dense pre-trained model {dense_workdir}")
        rows["pre-trained (dense) model"] = classify(_sampler(dense_config, mesh)(dense_params, labels, seeds[0]))
    log(f"sampling {samples} images from the KIND model {kind_workdir}, with and without tailors ({mode})")
    rows["KIND (learngene + tailors)"] = classify(sample(kind_params, labels, seeds[0]))
    rows["learngene (w/o tailors)"] = classify(sample(*learngene_only(kind_params, labels, n_classes, mode), seeds[0]))
    table = diversion_table(rows)
    stats = {name: prediction_statistics(p) for name, p in rows.items()}
    reading = (f"Statistics of each image's predicted class distribution by the {classifier}, averaged over "
               f"{samples} images: entropy (nats), variance and Pearson kurtosis over the classes "
               f"(kindjax.papers.kind.diversion); learngene = tailors off ({mode}).")
    write_bytes(as_path(out) / "table5.md", (table + "\n\n" + reading + "\n").encode())
    write_json(as_path(out) / "table5.json", {"rows": stats, "mode": mode, "samples": samples, "classifier": classifier})
    shown = list(range(min(n_classes, FIGURE_CLASSES)))
    grid = figure_grid(sample, kind_params, shown, seeds)
    upscale = max(1, 64 // grid.shape[2])
    picture = image_grid(grid.reshape((-1,) + grid.shape[2:]), rows=len(shown), upscale=upscale, pad=max(1, upscale // 2))
    write_bytes(as_path(out) / "figure7.png", png_bytes(picture))
    log(table + "\n" + reading + f"\nWrote {out}/table5.md, table5.json and figure7.png (rows: classes "
        f"{shown}; columns: seeds {list(seeds)} × with / without tailors)")
    return stats


def main(argv: list[str]) -> None:
    """Runs :func:`analyze` with the flags."""
    del argv
    f = flags.FLAGS
    analyze(f.run, f.out, f.dense_run, f.num_samples, f.mode)


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "KIND pre-training run (read; or one of its step directories).")
    flags.DEFINE_string("dense_run", "", "Dense pre-training run on the same classes (read; Table 5's baseline row).")
    flags.DEFINE_string("out", None, "Folder to write table5.md/json and figure7.png to.")
    flags.DEFINE_integer("num_samples", 500, "Images per model.")
    flags.DEFINE_enum("mode", MODES[0], list(MODES), "How the learngene samples alone (see kindjax.papers.kind.diversion).")
    flags.mark_flags_as_required(["run", "out"])
    cli.run(main)
