"""The evaluation at the end of training (the trainer's ``evaluate`` hook): ``eval.num_samples`` EMA
samples, balanced over the model's classes, scored by the chosen metrics
(:func:`kindjax.evaluation.metric.chosen_metrics`) of the needs a training process offers
(:data:`OFFERED`: the samples and the digits classifier; ADM's and DINOv2's are
``python -m kindjax.evaluation``'s).  By default the digits' sample accuracy and Fréchet distance on
the digits, nothing elsewhere."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from kindjax.evaluation.digits_evaluator import digit_ids, evaluator
from kindjax.evaluation.metrics import Inputs, Samples, chosen_metrics, compute_metrics, needs_of

#: The needs of metrics (:data:`kindjax.evaluation.metric.NEEDS`) computed at the end of training.
OFFERED = ("samples", "digits")


def training_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The chosen metrics computed at the end of training; an unknown name is a ConfigError."""
    return chosen_metrics(config, OFFERED)


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """``num_samples`` model labels cycling through ``0..num_classes−1``."""
    return np.arange(num_samples, dtype=np.int32) % num_classes


def score_samples(config: ml_collections.ConfigDict, images: np.ndarray, labels: np.ndarray,
                  names: tuple[str, ...] | None = None) -> dict[str, float]:
    """The metrics ``names`` (default: :func:`training_metrics`) of ``images`` in [-1, 1] with model
    labels ``labels``; the digits classifier reads them as the digits ``data.classes[label]``."""
    names = training_metrics(config) if names is None else names
    values: dict[str, Any] = {"samples": Samples(labels, images=images)}
    if "digits" in needs_of(names):
        values["digits"] = evaluator().outputs(images, digit_ids(config.data.classes, np.asarray(labels)))
    return compute_metrics(names, Inputs(**values))


def evaluate_samples(trainer: Any, state: dict) -> dict[str, float]:
    """:func:`score_samples` of ``eval.num_samples`` EMA samples, labels balanced over the classes
    (nothing is sampled when no chosen metric is computed at the end of training)."""
    cfg = trainer.config
    if not training_metrics(cfg):
        return {}
    labels = balanced_labels(cfg.eval.num_samples, trainer.model.num_classes)
    images = trainer.sample(state["ema_params"], jax.random.fold_in(trainer.base_key, 3 << 20), labels)
    return score_samples(cfg, images, labels)


def evaluation(config: ml_collections.ConfigDict) -> Callable[[Any, dict], dict[str, float]] | None:
    """The ``evaluate`` hook of a training stage of ``config``: :func:`evaluate_samples`, or None
    when no chosen metric is computed at the end of training (e.g. ImageNet: ADM's are the pipeline's)."""
    return evaluate_samples if training_metrics(config) else None
