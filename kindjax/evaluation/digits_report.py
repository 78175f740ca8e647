"""Scores a model trained on the embedded digits with the project's digits evaluator."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from kindjax.evaluation.digits_evaluator import DigitsEvaluator


@functools.lru_cache(maxsize=4)
def evaluator(seed: int = 0) -> DigitsEvaluator:
    """The ten-class evaluator (trained once per process and seed)."""
    return DigitsEvaluator.train(seed=seed)


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """``num_samples`` model labels cycling through ``0..num_classes−1``."""
    return np.arange(num_samples, dtype=np.int32) % num_classes


def digit_ids(classes: Sequence[int], labels: np.ndarray) -> np.ndarray:
    """Model labels → digit ids (``classes[label]``; identity when ``classes`` is empty)."""
    return np.asarray(tuple(classes) or range(10))[labels]


def evaluate_digits(trainer: Any, state: dict) -> dict[str, float]:
    """``sample_accuracy`` and ``frechet_distance`` of ``eval.num_samples`` EMA samples,
    balanced over the model's classes, scored against the real digits of those classes."""
    cfg = trainer.config
    labels = balanced_labels(cfg.eval.num_samples, trainer.model.num_classes)
    images = trainer.sample(state["ema_params"], jax.random.fold_in(trainer.base_key, 3 << 20), labels)
    return evaluator().evaluate(images, digit_ids(cfg.data.classes, labels))
