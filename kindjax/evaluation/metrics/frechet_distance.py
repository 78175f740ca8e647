"""The digits' Fréchet distance: Gaussians fitted to the digits classifier's features of the samples
and of the real digits of their classes (:mod:`kindjax.evaluation.digits_evaluator`); a default on the
digits."""
from __future__ import annotations

from kindjax.evaluation.digits_evaluator import is_digits_data
from kindjax.evaluation.metric import Inputs, Metric, register_metric


def frechet_distance(inputs: Inputs) -> float:
    """``‖μ_s − μ_r‖² + Tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^{1/2})`` on the classifier's features."""
    return inputs["digits"].frechet_distance()


FRECHET_DISTANCE = register_metric(Metric("frechet_distance", ("digits",), frechet_distance, "Fréchet distance",
                                          higher_is_better=False, fmt=".1f", short="frechet", default=is_digits_data))
