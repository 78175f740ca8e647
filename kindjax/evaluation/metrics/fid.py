"""FID (Heusel et al. 2017): the Fréchet distance of Gaussians fitted to the ``pool_3`` Inception
features of the samples and of the reference batch, as ADM's evaluator (:mod:`kindjax.evaluation.adm`)."""
from __future__ import annotations

from kindjax.evaluation.metric import Inputs, Metric, always, register_metric


def fid(inputs: Inputs) -> float:
    """``‖μ_s − μ_r‖² + Tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^{1/2})`` on ``pool_3``."""
    return inputs["inception"].frechet("pool_3")


FID = register_metric(Metric("fid", ("inception",), fid, "FID", higher_is_better=False, default=always))
