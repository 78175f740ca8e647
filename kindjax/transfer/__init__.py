"""Starting a model from a pre-trained one; ``config.init`` names the start:

- ``init.learngene`` (:mod:`kindjax.transfer.kind`): a KIND learngene, fresh tailors for new classes;
- ``init.pretrained`` (:mod:`kindjax.transfer.pretrained`): a dense or KIND DiT into any linear
  variant (the baselines), optionally only some blocks (:mod:`kindjax.transfer.layer_selection`:
  Heur-LG, Auto-LG);
- ``init.fine_learngene`` (:mod:`kindjax.transfer.fine`): FINE's shared ``U``, ``V`` into a FINE DiT of
  another depth (Σ set by ``init.fine_sigma``), or materialized into a dense DiT;
- ``init.pretrained`` with ``init.svd_rank``: FINE's "w/o Factorize" ablation (per-layer top-r SVD);
- ``init.grow`` (:mod:`kindjax.transfer.growth`): FINE's baselines (He, Mimetic, Share, TLEG, LiGO,
  prune) as initialisers of a dense DiT of any depth, from ``init.grow_from``.

:func:`load_teacher` reads the frozen teacher of ``train.distill``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections

from kindjax.transfer.fine import init_from_config, per_layer_svd_init
from kindjax.transfer.growth import grow_config, grow_init, load_teacher, prune_distill_config
from kindjax.transfer.kind import learngene_init, transfer_config
from kindjax.transfer.pretrained import pretrained_init

STARTS = ("learngene", "pretrained", "fine_learngene", "grow_from")


def starts_from_checkpoint(config: ml_collections.ConfigDict) -> bool:
    """True when ``config.init`` names a start (a pre-trained one, or an ``init.grow`` rule; else step 0
    is the model's own random init)."""
    return any(config.init.get(k) for k in STARTS) or bool(config.init.get("grow"))


def initial_params(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters for the start ``config.init`` names, given the model's ``fresh`` ones."""
    init = config.init
    if init.grow:
        return grow_init(config, fresh, key)
    if init.pretrained and init.get("svd_rank", 0):
        return per_layer_svd_init(config, fresh)
    if init.pretrained:
        return pretrained_init(config, fresh, key)
    if init.fine_learngene:
        return init_from_config(config, fresh, key)
    return learngene_init(config, fresh, key)


__all__ = ["STARTS", "grow_config", "initial_params", "load_teacher", "prune_distill_config",
           "starts_from_checkpoint", "transfer_config"]
