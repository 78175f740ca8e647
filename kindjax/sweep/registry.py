"""The sweep's experiments by name (:data:`EXPERIMENTS`, filled by the packages that define them), and
the one chosen for a config (``python -m kindjax.sweep``)."""
from __future__ import annotations

import ml_collections

from kindjax.registry import Registry
from kindjax.sweep.grid import Experiment

#: ``--experiment`` → :class:`kindjax.sweep.grid.Experiment`.
EXPERIMENTS: Registry[Experiment] = Registry("sweep experiment", key="--experiment")


def register_experiment(experiment: Experiment) -> Experiment:
    """Adds ``experiment`` under its name."""
    return EXPERIMENTS.register(experiment.name, experiment)


def experiment_for(config: ml_collections.ConfigDict, name: str = "") -> Experiment:
    """``--experiment`` if given, else the one experiment whose ``selects(config)`` is true."""
    if name:
        return EXPERIMENTS[name]
    fitting = [e for e in EXPERIMENTS.values() if e.selects is not None and e.selects(config)]
    if len(fitting) != 1:
        which = f"{len(fitting)} fit it ({[e.name for e in fitting]})" if fitting else "none fits it"
        raise ValueError(f"no one experiment is chosen by this config (data.name={config.data.name!r}, data.grouping="
                         f"{config.data.grouping!r}, model.linear.kind={config.model.linear.kind!r}): {which}; give "
                         f"--experiment, one of {sorted(EXPERIMENTS)}")
    return fitting[0]
