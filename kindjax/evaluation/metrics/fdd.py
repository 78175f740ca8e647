"""FDD (Stein et al. 2023): the Fréchet distance of DINOv2 features of the samples and of the reference
images (:mod:`kindjax.evaluation.dinov2`); a default when ``eval.dinov2_weights`` is set."""
from __future__ import annotations

import ml_collections

from kindjax.evaluation.dinov2 import fdd as frechet_dinov2_distance
from kindjax.evaluation.metric import Inputs, Metric, register_metric


def fdd(inputs: Inputs) -> float:
    """``‖μ_s − μ_r‖² + Tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^{1/2})`` on DINOv2 CLS features, each first mapped
    by ``eval.fdd_normalize`` (:func:`kindjax.evaluation.dinov2.fdd`)."""
    features = inputs["dinov2"]
    return frechet_dinov2_distance(features.samples, features.reference, features.normalize)


def dinov2_given(config: ml_collections.ConfigDict) -> bool:
    """``eval.dinov2_weights`` is set."""
    return bool(config.eval.dinov2_weights)


FDD = register_metric(Metric("fdd", ("dinov2",), fdd, "FDD", higher_is_better=False, fmt=".3f", default=dinov2_given))
