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


def save_features(path: str, features: dict[str, np.ndarray], preprocessing: str) -> None:
    """Writes the :data:`FEATURES` that ``features`` holds to ``path`` (``.npz``), atomically, with the
    Inception ``preprocessing`` they were computed with (under :data:`kindjax.evaluation.adm.PREPROCESS_KEY`)."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in features.items() if k in FEATURES},
                 **{adm.PREPROCESS_KEY: np.asarray(preprocessing)})
    tmp.rename(path)


def load_features(path: str) -> dict[str, np.ndarray | str]:
    """The arrays of a features file, and its recorded preprocessing as a ``str`` (absent: unrecorded)."""
    with epath.Path(path).open("rb") as f, np.load(f) as z:
        out = {k: z[k] for k in z.files if k != adm.PREPROCESS_KEY}
        if adm.PREPROCESS_KEY in z.files:
            out[adm.PREPROCESS_KEY] = adm.recorded_preprocessing(z)
        return out


def concatenate(features: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = set.intersection(*(set(f) for f in features)) - {adm.PREPROCESS_KEY}
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
    of ``references`` (features of every run's samples and of every run's reference batch); refuses
    features of different Inception preprocessing (:func:`kindjax.evaluation.adm.check_same_preprocessing`)."""
    sides = {f"{side} {i}": f.get(adm.PREPROCESS_KEY) for side, group in (("samples", samples), ("reference", references))
             for i, f in enumerate(group)}
    adm.check_same_preprocessing(sides)
    s, r = concatenate(samples), concatenate(references)
    names = poolable() if names is None else names
    return compute_metrics(names, Inputs(inception=adm.InceptionFeatures(s, adm.statistics(r), r)))
