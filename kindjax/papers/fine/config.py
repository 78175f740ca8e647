"""FINE's config keys (:class:`kindjax.config.Extension` ``"fine"``) and their checks.

``init.fine_learngene`` starts a FINE model of any depth, width or rank from a FINE checkpoint's
shared ``U``, ``V`` (:mod:`kindjax.papers.fine.transfer`); ``init.grow`` / ``init.grow_from`` start a
dense DiT of any depth by one of FINE's baselines (:mod:`kindjax.papers.fine.growth`);
``init.svd_rank`` is FINE's "w/o Factorize" ablation; ``job="fine_init"`` runs the Σ-only stage,
then normal training (:mod:`kindjax.papers.fine.jobs`).
"""
from __future__ import annotations

import ml_collections

from kindjax.config import Extension, require, start_keys
from kindjax.papers.fine.facts import GROWTH, GROWTH_FROM_SOURCE
#: ``init.fine_sigma``: how a FINE initialisation sets the new layers' Σ (:mod:`kindjax.papers.fine.transfer`).
FINE_SIGMA = ("identical", "linear", "random", "trained", "copy")
#: ``init.sigma_start``: the Σ the Σ-only stage of ``job="fine_init"`` starts from (:mod:`kindjax.papers.fine.jobs`).
SIGMA_STARTS = ("random", "copy")

DEFAULTS = {
    # A FINE checkpoint whose shared U, V initialise this FINE model of any depth/width/rank
    # (kindjax.papers.fine.transfer.init_from_fine_learngene).
    "init.fine_learngene": "",
    # FINE's baselines (kindjax.papers.fine.growth): a dense DiT of this config's depth initialised
    # by "scratch" (He), "mimetic", "share", "tleg", "ligo" or "prune" from grow_from.
    "init.grow": "",
    "init.grow_from": "",       # source workdir (share, prune: dense/KIND; tleg: kind='tleg'; ligo)
    "init.grow_blocks": (),     # share/prune: source block of each target block (() = default map)
    # How the new model's per-layer Σ are set (FINE Table 5): "identical" (every layer the source's
    # mean Σ), "linear" (the source's first-to-last Σ interpolated over depth), "random", "trained"
    # (random, then the Σ-only stage of job="fine_init"), "copy" (the source's own Σ_l; same depth).
    "init.fine_sigma": "identical",
    "init.sigma_start": "random",  # job="fine_init": the Σ-only stage starts from "random" Σ (FINE's notes: "Σ_tgt is
                                   # randomly initialised and then optimised alone"), or "copy": the source's own
                                   # per-layer Σ (a model of the source's depth)
    "init.sigma_steps": 300,    # job="fine_init": steps of the Σ-only stage (U, V and the rest frozen)
    "init.sigma_lr": 1e-3,      # its learning rate
    "init.sigma_batches": 50,   # its data: the first sigma_batches batches of the data order, cycled
                                # (0: the whole training data)
    "init.materialize": True,   # job="fine_init": train on as a dense DiT (W = U·Σ·Vᵀ built once), or
                                # False: keep U, Σ, V factorized (all of them train)
    # "w/o Factorize" (FINE Table 4): with init.pretrained (a dense DiT), block l' of this dense model
    # of depth L' takes source block round(l'·(L−1)/(L'−1)), every main matrix cut to its own top
    # svd_rank singular components; 0: off.
    "init.svd_rank": 0,
}


def validate(config: ml_collections.ConfigDict) -> None:
    """FINE's keys, and the growth variants (``tleg``, ``ligo``) they build."""
    m, i = config.model, config.init
    if i.grow or i.grow_from or i.grow_blocks:
        require(i.grow in GROWTH, f"init.grow={i.grow!r}: use one of {list(GROWTH)} (init.grow_from and "
                                  f"init.grow_blocks need it)")
        require(bool(i.grow_from) == (i.grow in GROWTH_FROM_SOURCE),
                f"init.grow={i.grow!r} needs init.grow_from (the pre-trained source workdir)"
                if i.grow in GROWTH_FROM_SOURCE else f"init.grow={i.grow!r} reads no source: clear init.grow_from")
        others = [k for k in start_keys() if i[k] and k != "grow_from"]
        require(not others, f"init.grow and init.{others[0] if others else ''} are different starts: set one of them")
        require(not i.grow_blocks or i.grow in ("share", "prune"),
                f"init.grow_blocks maps target blocks to source blocks for init.grow='share' or 'prune', "
                f"not {i.grow!r}")
        kinds = ("dense", "ligo") if i.grow == "ligo" else ("dense",)
        require(m.linear.kind in kinds, f"init.grow={i.grow!r} initialises a model.linear.kind in {list(kinds)}, "
                                        f"got {m.linear.kind!r}")
    if m.linear.kind in ("tleg", "ligo"):
        require(not m.scan_blocks, f"model.linear.kind={m.linear.kind!r} reads each block's index from its "
                                   f"name: set model.scan_blocks=False")
    if m.linear.kind == "ligo":
        require(i.grow == "ligo", "model.linear.kind='ligo' learns growth coefficients over a pre-trained "
                                  "DiT's layers: set init.grow='ligo' and init.grow_from=<that workdir>")
    require(i.fine_sigma in FINE_SIGMA, f"init.fine_sigma={i.fine_sigma!r}: use one of {list(FINE_SIGMA)}")
    if config.job == "fine_init":
        require(bool(i.fine_learngene), "job='fine_init' needs init.fine_learngene (a FINE pre-training workdir)")
        require(i.fine_sigma != "copy", "job='fine_init' sets the new layers' Σ: init.fine_sigma='copy' is for "
                                        "a train job continuing a model of the same depth")
        require(i.sigma_start in SIGMA_STARTS, f"init.sigma_start={i.sigma_start!r}: use one of {list(SIGMA_STARTS)}")
        require(i.sigma_steps > 0 and i.sigma_lr > 0 and i.sigma_batches >= 0,
                f"init.sigma_steps={i.sigma_steps} and init.sigma_lr={i.sigma_lr} must be positive, "
                f"init.sigma_batches={i.sigma_batches} ≥ 0")
    elif i.fine_learngene:
        require(i.fine_sigma != "trained", "init.fine_sigma='trained' is the Σ-only stage of job='fine_init'; "
                                           "set job='fine_init', or another init.fine_sigma")
    require(i.svd_rank >= 0, f"init.svd_rank={i.svd_rank} must be ≥ 0 (0: off)")
    if i.svd_rank:
        require(bool(i.pretrained) and m.linear.kind == "dense" and not (i.select or i.blocks or i.svd_components),
                "init.svd_rank ('w/o Factorize') needs init.pretrained (a dense DiT), model.linear.kind='dense' "
                "and no init.select / init.blocks / init.svd_components")


EXTENSION = Extension(DEFAULTS, starts=("fine_learngene", "grow_from"), validate=validate)
