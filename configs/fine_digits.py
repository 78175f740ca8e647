"""FINE on the embedded digits (8×8, 10 classes): ``configs/dit_digits.py`` with FINE layers.

FINE's five matrix types per block (the fused qkv, attention out, MLP in, MLP out, adaLN
modulation; ``model.linear.layout="paper"``) are each ``W_l = U · diag(σ_l) · Vᵀ`` with
``U``, ``V`` shared by the four blocks and rank 32 = hidden/4 (the FINE supplementary's
"sigma share", read as the rank: 100 for DiT-B's 768, 148 for DiT-L's 1024).  The trained
``fine_bases`` are the learngene: ``--config.job=fine_init --config.init.fine_learngene=WORKDIR
--config.model.depth=6 --config.init.fine_sigma=trained`` initialises a DiT of another depth
(Σ-only stage, then normal training; ``kindjax.train.stages``, ``kindjax.papers.fine.transfer``).
"""
from configs.dit_digits import get_config as dit_digits_config
from kindjax.papers.fine.layer import fine_config


def get_config():
    config = dit_digits_config()
    config.model.linear = fine_config(rank=32)
    return config
