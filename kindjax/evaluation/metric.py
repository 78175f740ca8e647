"""Metrics by name: what each needs, how it is computed from that, and its table column.

A metric is one module that registers a :class:`Metric` under its name (:func:`register_metric`;
the built-in ones are the modules of :mod:`kindjax.evaluation.metrics`, which is what callers
import). ``eval.metrics`` (a tuple of names) chooses them; empty, every metric whose
``default(config)`` holds. Each evaluation computes the chosen metrics whose :data:`NEEDS` it
offers:

- the end of training (:mod:`kindjax.evaluation.end_of_training`): ``samples``, ``digits``;
- ``python -m kindjax.evaluation`` (:mod:`kindjax.evaluation.pipeline`): ``samples``,
  ``inception``, ``dinov2``;
- metrics of samples pooled over runs (:mod:`kindjax.evaluation.pooled`): ``inception``.

So by default the digits are scored by the digits classifier at the end of training, and every
model by ADM's metrics (FDD too when ``eval.dinov2_weights`` is set) in the evaluation pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping

import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.io.logs import to_uint8
from kindjax.registry import Registry, UnknownName

#: What a metric may need (:attr:`Metric.needs`), by name.
NEEDS = {
    "samples": "the generated images (floats in [-1, 1] or uint8 RGB) and their model labels (:class:`Samples`)",
    "digits": "the digits classifier's outputs on the samples "
              "(:class:`kindjax.evaluation.digits_evaluator.DigitsOutputs`)",
    "inception": "FID Inception features of the samples and of the reference batch "
                 "(:class:`kindjax.evaluation.adm.InceptionFeatures`)",
    "dinov2": "DINOv2 features of the samples and of the reference images "
              "(:class:`kindjax.evaluation.dinov2.DinoFeatures`)",
}


def to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] NHWC floats (1 or 3 channels) → uint8 RGB (one channel repeated three times)."""
    pixels = to_uint8(images)
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    return pixels


class Samples:
    """Generated images and their model labels ``(N,)``, given as ``images`` in [-1, 1] ``(N, H, W, C)``
    (as the model drew them) or as ``pixels``, uint8 RGB ``(N, H, W, 3)`` (as an ADM sample batch holds
    them); the other form is derived on first use: ``pixels = round(127.5·(images + 1))`` (one
    channel repeated to RGB), ``images = pixels / 127.5 − 1``."""

    def __init__(self, labels: np.ndarray, *, images: np.ndarray | None = None,
                 pixels: np.ndarray | None = None) -> None:
        if (images is None) == (pixels is None):
            raise ValueError("give the samples as images (floats in [-1, 1]) or as pixels (uint8 RGB), one of them")
        self.labels = np.asarray(labels)
        self._images = None if images is None else np.asarray(images)
        self._pixels = pixels

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = self._pixels.astype(np.float32) / 127.5 - 1.0
        return self._images

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = to_rgb_uint8(self._images)
        return self._pixels


class Inputs:
    """What one evaluation offers its metrics: ``need → value`` (:data:`NEEDS`), plus quantities
    several metrics share, computed once (:meth:`shared`, e.g. precision and recall's balls)."""

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(NEEDS))
        if unknown:
            raise ValueError(f"unknown needs {unknown}; known: {sorted(NEEDS)}")
        self._values = values
        self._shared: dict[str, Any] = {}

    def __getitem__(self, need: str) -> Any:
        return self._values[need]

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the same value after."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


def never(config: ml_collections.ConfigDict) -> bool:
    """The default of a metric that is computed only when ``eval.metrics`` names it."""
    return False


def always(config: ml_collections.ConfigDict) -> bool:
    """The default of a metric that every evaluation offering its needs computes."""
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
    """``name``: its ``eval.metrics`` name and its key in reports; ``compute(inputs)``: the value
    from :class:`Inputs` holding ``needs`` (None: these inputs cannot give it, e.g. precision
    without reference images: it is left out); ``header``, ``higher_is_better`` (↑/↓) and ``fmt``:
    its table column; ``short``: a compact key (file names, the digits table's keys; default the
    name); ``default(config)``: chosen when ``eval.metrics`` is empty."""

    name: str
    needs: tuple[str, ...]
    compute: Callable[[Inputs], float | None]
    header: str
    higher_is_better: bool
    fmt: str = ".2f"
    short: str = ""
    default: Callable[[ml_collections.ConfigDict], bool] = never

    @property
    def label(self) -> str:
        """The column header with its direction: ``FID ↓``."""
        return f"{self.header} {'↑' if self.higher_is_better else '↓'}"

    @property
    def key(self) -> str:
        """:attr:`short`, or the name."""
        return self.short or self.name

    @property
    def column(self) -> tuple[str, str, str]:
        """``(name, label, fmt)``: a column of :mod:`kindjax.sweep.tables`."""
        return self.name, self.label, self.fmt


#: ``eval.metrics`` name → :class:`Metric`.
METRICS: Registry[Metric] = Registry("metric", key="eval.metrics")


def register_metric(metric: Metric) -> Metric:
    """Adds ``metric`` under its name; refuses needs outside :data:`NEEDS`."""
    unknown = sorted(set(metric.needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"metric {metric.name!r} needs {unknown}, which no evaluation offers; known needs: "
                         f"{sorted(NEEDS)}")
    return METRICS.register(metric.name, metric)


def chosen_metrics(config: ml_collections.ConfigDict, offered: Collection[str]) -> tuple[str, ...]:
    """The metrics of ``eval.metrics`` (empty: the defaults) that an evaluation offering the needs
    ``offered`` computes, in that order; an unknown name is a :class:`ConfigError`."""
    names = tuple(config.eval.metrics)
    try:
        metrics = {n: METRICS[n] for n in names}
    except UnknownName as e:
        joined = next((n for n in names if isinstance(n, str) and "," in n), None)
        hint = "" if joined is None else (f" (on the command line, a tuple: --config.eval.metrics=\""
                                          f"{tuple(p.strip() for p in joined.split(','))}\")")
        raise ConfigError(f"{e}{hint}") from None
    if not names:
        metrics = {n: m for n, m in METRICS.items() if m.default(config)}
    return tuple(n for n, m in metrics.items() if set(m.needs) <= set(offered))


def needs_of(names: Collection[str]) -> set[str]:
    """Everything the metrics ``names`` need."""
    return {need for n in names for need in METRICS[n].needs}


def compute_metrics(names: Collection[str], inputs: Inputs) -> dict[str, float]:
    """``name → value`` of each metric of ``names`` (those that give None are left out)."""
    values = {n: METRICS[n].compute(inputs) for n in names}
    return {n: float(v) for n, v in values.items() if v is not None}


def metric_values(report: Mapping[str, Any]) -> dict[str, float]:
    """The registered metrics of ``report`` (e.g. a run's ``metrics.json``), in its order."""
    return {k: float(v) for k, v in report.items() if k in METRICS}
