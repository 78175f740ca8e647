"""Inception Score (Salimans et al. 2016) over splits of 5000 samples, as ADM's evaluator
(:func:`kindjax.evaluation.adm.inception_score`)."""
from __future__ import annotations

from kindjax.evaluation import adm
from kindjax.evaluation.metric import Inputs, Metric, always, register_metric


def inception_score(inputs: Inputs) -> float:
    """``mean_s exp(mean_{n∈s} KL(p_n ‖ p̄_s))``, ``p_n = softmax(logits_unbiased_n)``."""
    return adm.inception_score(inputs["inception"].samples["logits_unbiased"])


INCEPTION_SCORE = register_metric(Metric("inception_score", ("inception",), inception_score, "IS",
                                         higher_is_better=True, default=always))
