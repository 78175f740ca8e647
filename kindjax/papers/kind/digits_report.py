"""KIND's pre-training report on the digits: the class-conditional samples, the learngene alone,
and a model recombined from the learngene and a few classes' tailors."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kindjax.checkpoints.learngene import assemble, load_learngene, load_tailors
from kindjax.diffusion.generate import generate
from kindjax.evaluation.digits_evaluator import evaluator
from kindjax.evaluation.end_of_training import balanced_labels, evaluate_samples

#: The report's names of metrics whose prefixed name would differ from the first releases' keys.
REPORT_NAMES = {"sample_accuracy": "accuracy"}


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` as ``<prefix>_<name>`` (``kind_accuracy``, ``novel_frechet_distance``, …)."""
    return {f"{prefix}_{REPORT_NAMES.get(k, k)}": v for k, v in metrics.items()}


def evaluate_kind_digits(trainer: Any, state: dict) -> dict[str, float]:
    """The KIND pre-training report on the digits (EMA weights):

    ``kind_<metric>`` (by default ``kind_accuracy``, ``kind_frechet_distance``): the chosen metrics of
    class-conditional samples, tailors on (:func:`kindjax.evaluation.end_of_training.evaluate_samples`);
    ``learngene_only_entropy``: entropy of the distribution of predicted classes (over the
    pre-training classes) of null-class samples — the learngene alone, no guidance —
    normalised by log k (1: the learngene favours no class);
    ``learngene_only_sample_entropy``: the mean per-sample prediction entropy of those
    samples, normalised by log k (near 0: each sample is a clear digit);
    ``recombined_accuracy``: the model assembled from the learngene and the tailors of
    ``transfer.recombine_classes`` only, read back from the saved checkpoint;
    ``full_accuracy_on_recombined``: the full model's accuracy on those same classes.
    """
    cfg, model = trainer.config, trainer.model
    classes = tuple(cfg.data.classes) or tuple(range(model.num_classes))
    n = cfg.eval.num_samples
    report = prefixed("kind", evaluate_samples(trainer, state))
    key = jax.random.fold_in(trainer.base_key, 4 << 20)

    unguided = cfg.sample.copy_and_resolve_references()
    unguided.cfg_scale = 1.0
    images = generate(model, state["ema_params"], trainer.diffusion, key,
                      np.full(n, model.num_classes, np.int32), unguided, cfg.eval.batch_size, trainer.mesh,
                      progress=trainer.progress)
    report["learngene_only_entropy"] = evaluator().class_distribution_entropy(images, classes)
    report["learngene_only_sample_entropy"] = evaluator().normalized_prediction_entropy(images, classes)

    kept = tuple(cfg.transfer.recombine_classes)
    if kept:
        assembled = assemble(load_learngene(trainer.workdir), load_tailors(trainer.workdir, kept))
        labels = balanced_labels(n, len(kept))
        digits = np.asarray(classes)[np.asarray(kept)][labels]
        images = generate(assembled.model, assembled.params, trainer.diffusion, jax.random.fold_in(key, 1),
                          labels, cfg.sample, cfg.eval.batch_size, trainer.mesh, progress=trainer.progress)
        report["recombined_accuracy"] = evaluator().evaluate(images, digits)["sample_accuracy"]
        full = trainer.sample(state["ema_params"], jax.random.fold_in(key, 2), np.asarray(kept)[labels])
        report["full_accuracy_on_recombined"] = evaluator().evaluate(full, digits)["sample_accuracy"]
    return report
