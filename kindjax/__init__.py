"""kindjax: decomposable diffusion transformers in JAX/Flax (the papers' methods: :mod:`kindjax.papers`).

The Python API for a learngene, imported on first use (``import kindjax`` itself loads nothing heavy):
:func:`build_model`, :func:`load_learngene`, :func:`load_tailors`, :func:`assemble`.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name → the module that defines it.
_API = {"assemble": "kindjax.checkpoints.learngene", "load_learngene": "kindjax.checkpoints.learngene",
        "load_tailors": "kindjax.checkpoints.learngene", "build_model": "kindjax.models.dit"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kindjax' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
