"""Shared settings of the FINE ImageNet 256² latent configs (``configs/fine_dit_*.py``, ``configs/fine_init_dit_*.py``).

FINE pre-training (supplementary Table 7): AdamW, lr 1e-4, weight decay 0, batch 64, 300K steps,
drop path 0.5, class dropout 0.1, "sigma share" B 100 / L 148 (read as the shared rank r,
:mod:`kindjax.papers.fine.layer`), SD-VAE ft-EMA latents; bf16 compute as the other ImageNet configs.
Initialisation of the depth variants (main text, Table 1, per ``papers/fine_main_notes.md``):
targets L4, L6, L8, L10, L12 at the learngene's width, trained 100K steps after initialisation.
"""
import ml_collections

from configs.imagenet_dit import imagenet_config
from kindjax.archs import with_depth
from kindjax.papers.fine import facts
from kindjax.papers.fine.layer import fine_config

#: How the new layers are set (``init.fine_sigma``; FINE Table 5), or ``per_layer_svd`` (Table 4's
#: "w/o Factorize": a dense DiT of ``init.pretrained`` cut per layer to its top-r SVD).
FINE_INIT_RULES = ("trained", "random", "identical", "linear", "per_layer_svd")


def fine_pretrain_config(arch: str):
    """FINE pre-training of DiT-``arch``/2 on ImageNet-1K (Table 7)."""
    config = imagenet_config(arch)
    config.model.linear = fine_config(rank=facts.RANK[arch])
    config.model.drop_path = facts.PRETRAIN_DROP_PATH
    config.train.update(batch_size=facts.PRETRAIN_BATCH, num_steps=facts.PRETRAIN_STEPS)
    return config


def fine_init_config(arch: str, spec: str):
    """A Table 1 target: ``spec = "depth_D[,RULE]"`` with ``D`` in :data:`kindjax.papers.fine.facts.TARGET_DEPTHS` (any depth
    ≥ 1 is accepted) and ``RULE`` in :data:`FINE_INIT_RULES` (default ``trained``: FINE).

    FINE rules: ``job="fine_init"`` from the FINE pre-training run at ``init.fine_learngene`` (set it),
    the Σ-only stage (``init.sigma_*`` defaults: 300 steps on 50 batches at lr 1e-3) for ``trained``,
    then 100K steps of the materialized dense DiT (``init.materialize``).  ``per_layer_svd``: a dense
    DiT from ``init.pretrained`` (set it to a dense DiT-``arch`` run), each layer its own top-r SVD.
    """
    depth_part, _, rule = spec.partition(",")
    rule = rule or "trained"
    if not depth_part.startswith("depth_") or not depth_part[6:].isdigit() or int(depth_part[6:]) < 1:
        raise ValueError(f"config spec {spec!r}: use depth_D[,RULE], e.g. configs/fine_init_dit_b.py:depth_8 "
                         f"(Table 1 depths {facts.TARGET_DEPTHS})")
    if rule not in FINE_INIT_RULES:
        raise ValueError(f"config spec {spec!r}: unknown rule {rule!r}; use one of {FINE_INIT_RULES}")
    config = fine_pretrain_config(arch)
    config.model.update(with_depth(config.model, int(depth_part[6:])), drop_path=0.0)
    config.train.num_steps = facts.TARGET_STEPS
    if rule == "per_layer_svd":
        config.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
        config.init.svd_rank = facts.RANK[arch]
        return config
    config.job = "fine_init"
    config.init.fine_sigma = rule
    return config
