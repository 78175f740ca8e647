"""The built-in metrics, one module each, registered in :data:`kindjax.evaluation.metric.METRICS` on
import (import this package, not :mod:`kindjax.evaluation.metric`, to read the registry with them):
ADM's FID, sFID, Inception Score, precision and recall, FDD, and the digits classifier's sample
accuracy and Fréchet distance.  A new metric is one more module that registers a
:class:`~kindjax.evaluation.metric.Metric` (here, or in any package of the ``kindjax.papers`` entry
points), chosen by its name in ``eval.metrics``."""
from kindjax.evaluation.metric import (METRICS, Inputs, Metric, Samples, chosen_metrics, compute_metrics,
                                       metric_values, needs_of, register_metric)
# Registered in this order, the order of the default columns: ADM's table (FID, sFID, IS, Prec., Recall), FDD,
# then the digits'.
from kindjax.evaluation.metrics import fid, sfid, inception_score, precision_recall, fdd  # noqa: I001
from kindjax.evaluation.metrics import sample_accuracy, frechet_distance

__all__ = ["METRICS", "Inputs", "Metric", "Samples", "chosen_metrics", "compute_metrics", "metric_values",
           "needs_of", "register_metric", "fdd", "fid", "frechet_distance", "inception_score", "precision_recall",
           "sample_accuracy", "sfid"]
