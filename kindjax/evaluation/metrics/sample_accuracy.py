"""Sample accuracy: the fraction of samples the digits classifier reads as their class
(:mod:`kindjax.evaluation.digits_evaluator`); a default on the digits."""
from __future__ import annotations

from kindjax.evaluation.digits_evaluator import is_digits_data
from kindjax.evaluation.metric import Inputs, Metric, register_metric


def sample_accuracy(inputs: Inputs) -> float:
    """``mean_n [argmax_j logits_nj = label_n]``."""
    return inputs["digits"].accuracy()


SAMPLE_ACCURACY = register_metric(Metric("sample_accuracy", ("digits",), sample_accuracy, "accuracy",
                                         higher_is_better=True, fmt=".3f", short="accuracy", default=is_digits_data))
