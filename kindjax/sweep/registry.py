"""The sweep's experiments by name, and the one chosen for a config (``python -m kindjax.sweep``).

A module of its own because experiments build on each other's helpers (``domain_shift`` on
``kind_tables``', ``table1`` on ``common``): the registry imports them all, none imports the registry.
"""
from __future__ import annotations

import ml_collections

from kindjax.sweep.domain_shift import DOMAIN_SHIFT
from kindjax.sweep.experiments import DIGITS, KIND_TABLES
from kindjax.sweep.fine_depths import FINE_DEPTHS
from kindjax.sweep.grid import Experiment
from kindjax.sweep.table1 import TABLE1

EXPERIMENTS = {e.name: e for e in (DIGITS, KIND_TABLES, FINE_DEPTHS, TABLE1, DOMAIN_SHIFT)}


def experiment_for(config: ml_collections.ConfigDict, name: str = "") -> Experiment:
    """``--experiment`` if given, else from the config: digits data → ``digits`` (``fine_depths`` for a
    FINE model); ``data.grouping='kind'`` → ``kind_tables``; KIND layers on an image folder →
    ``domain_shift``."""
    if name:
        if name not in EXPERIMENTS:
            raise ValueError(f"--experiment={name!r}: use one of {sorted(EXPERIMENTS)}")
        return EXPERIMENTS[name]
    if config.data.name == "digits":
        return FINE_DEPTHS if config.model.linear.kind == "fine" else DIGITS
    if config.data.grouping == "kind":
        return KIND_TABLES
    if config.data.name == "folder" and config.model.linear.kind == "kind":
        return DOMAIN_SHIFT
    raise ValueError(f"no experiment fits this config (data.name={config.data.name!r}, data.grouping="
                     f"{config.data.grouping!r}); give --experiment, one of {sorted(EXPERIMENTS)}")
