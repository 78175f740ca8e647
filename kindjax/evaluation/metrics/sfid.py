"""sFID (Nash et al. 2021): the Fréchet distance on the ``spatial`` Inception features (``mixed_6/conv``,
first 7 channels), as ADM's evaluator (:mod:`kindjax.evaluation.adm`)."""
from __future__ import annotations

from kindjax.evaluation.metric import Inputs, Metric, always, register_metric


def sfid(inputs: Inputs) -> float:
    """``‖μ_s − μ_r‖² + Tr(Σ_s + Σ_r − 2 (Σ_s Σ_r)^{1/2})`` on ``spatial``."""
    return inputs["inception"].frechet("spatial")


SFID = register_metric(Metric("sfid", ("inception",), sfid, "sFID", higher_is_better=False, default=always))
