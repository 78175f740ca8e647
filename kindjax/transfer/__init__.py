"""Starting a model from a pre-trained one: the *starts*, each chosen by ``config.init``.

The core's start is ``init.pretrained`` (:mod:`kindjax.transfer.pretrained`): a dense DiT (or the
learngene part of a factorised one) into any linear variant (the baselines), optionally only some
blocks (:mod:`kindjax.transfer.layer_selection`: Heur-LG, Auto-LG).  Packages register their own
starts (:data:`STARTS`); :func:`initial_params` runs the one that applies, :func:`load_teacher` reads
the frozen teacher of ``train.distill``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import ml_collections

from kindjax.registry import Registry
from kindjax.transfer.pretrained import load_teacher, pretrained_init


@dataclasses.dataclass(frozen=True)
class Start:
    """``applies(config)``: this start is the one ``config.init`` names; ``init(config, fresh, key)``:
    the step-0 parameters from the model's ``fresh`` ones.  Of several that apply, the highest
    ``priority`` wins (a start that refines another, e.g. ``init.pretrained`` with a cut)."""

    applies: Callable[[ml_collections.ConfigDict], bool]
    init: Callable[[ml_collections.ConfigDict, Mapping[str, Any], jax.Array], dict]
    priority: int = 0


#: The starts by name.
STARTS: Registry[Start] = Registry("start")


def register_start(name: str, applies: Callable[[ml_collections.ConfigDict], bool],
                   init: Callable[[ml_collections.ConfigDict, Mapping[str, Any], jax.Array], dict],
                   priority: int = 0) -> Start:
    """Adds start ``name`` (see :class:`Start`)."""
    return STARTS.register(name, Start(applies, init, priority))


register_start("pretrained", lambda config: bool(config.init.pretrained), pretrained_init)


def start_of(config: ml_collections.ConfigDict) -> Start | None:
    """The start ``config.init`` names (None: step 0 is the model's own random init)."""
    applying = [s for s in STARTS.values() if s.applies(config)]
    return max(applying, key=lambda s: s.priority) if applying else None


def starts_from_checkpoint(config: ml_collections.ConfigDict) -> bool:
    """True when ``config.init`` names a start (a pre-trained one, or a rule such as a growth
    initialiser; else step 0 is the model's own random init)."""
    return start_of(config) is not None


def initial_params(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters for the start ``config.init`` names, given the model's ``fresh`` ones."""
    start = start_of(config)
    if start is None:
        raise ValueError("config.init names no start: the model's fresh parameters are its step 0")
    return start.init(config, fresh, key)


__all__ = ["STARTS", "Start", "initial_params", "load_teacher", "register_start", "start_of",
           "starts_from_checkpoint"]
