"""ADM metrics of samples pooled over several runs (e.g. one method's runs on the tasks of a sweep).

``python -m kindjax.evaluation`` keeps each run's Inception features (``features_<step>.npz``: the
samples' ``pool_3``, ``spatial`` and ``logits_unbiased``) and its reference batch's
(``reference_features_<step>.npz``).  The pooled metrics concatenate the runs' sample features and
their references' features, then compute the metrics of Inception features (FID, sFID, IS, precision,
recall, any other registered one: :func:`poolable`) on the union, as if one model had drawn all the
samples: ``FID(∪ samples, ∪ references)``, which no average of per-run FIDs gives (the Fréchet
distance of the union is not a function of the per-run distances).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from etils import epath

from kindjax.evaluation import adm
from kindjax.evaluation.metrics import METRICS, Inputs, compute_metrics

#: The sample features the pooled metrics need.
FEATURES = ("pool_3", "spatial", "logits_unbiased")


def save_features(path: str, features: dict[str, np.ndarray]) -> None:
    """Writes the :data:`FEATURES` that ``features`` holds to ``path`` (``.npz``), atomically."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in features.items() if k in FEATURES})
    tmp.rename(path)


def load_features(path: str) -> dict[str, np.ndarray]:
    with epath.Path(path).open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def concatenate(features: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = set.intersection(*(set(f) for f in features))
    return {k: np.concatenate([f[k] for f in features]) for k in sorted(keys)}


#: The needs of metrics (:data:`kindjax.evaluation.metric.NEEDS`) the kept features give.
OFFERED = ("inception",)


def poolable(names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The metrics of ``names`` (default: every registered one) computed from Inception features alone."""
    names = tuple(METRICS) if names is None else names
    return tuple(n for n in names if set(METRICS[n].needs) <= set(OFFERED))


def pooled_metrics(samples: Sequence[dict[str, np.ndarray]], references: Sequence[dict[str, np.ndarray]],
                   names: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics ``names`` (default: :func:`poolable`) of the union of ``samples`` against the union
    of ``references`` (features of every run's samples and of every run's reference batch)."""
    s, r = concatenate(samples), concatenate(references)
    names = poolable() if names is None else names
    return compute_metrics(names, Inputs(inception=adm.InceptionFeatures(s, adm.statistics(r), r)))
