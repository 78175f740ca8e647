"""Precision and recall (Kynkäänniemi et al. 2019) of the samples' ``pool_3`` features against the
reference's, k = 3, as ADM's evaluator (:func:`kindjax.evaluation.adm.precision_recall`): two metrics
of one computation, shared by both.  A reference of statistics only gives neither."""
from __future__ import annotations

from kindjax.evaluation import adm
from kindjax.evaluation.metric import Inputs, Metric, always, register_metric


def precision_and_recall(inputs: Inputs) -> tuple[float, float] | None:
    """(precision, recall), computed once per :class:`Inputs`; None without reference features."""
    f = inputs["inception"]
    if f.reference is None:
        return None
    return inputs.shared("precision_recall", lambda: adm.precision_recall(f.reference["pool_3"], f.samples["pool_3"]))


def precision(inputs: Inputs) -> float | None:
    """The fraction of samples inside some reference point's k-NN ball."""
    both = precision_and_recall(inputs)
    return None if both is None else both[0]


def recall(inputs: Inputs) -> float | None:
    """The fraction of reference points inside some sample's k-NN ball."""
    both = precision_and_recall(inputs)
    return None if both is None else both[1]


PRECISION = register_metric(Metric("precision", ("inception",), precision, "Prec.", higher_is_better=True,
                                   default=always))
RECALL = register_metric(Metric("recall", ("inception",), recall, "Recall", higher_is_better=True, default=always))
