"""FINE on the embedded digits (8×8, 10 classes): ``configs/dit_digits.py`` with FINE layers.

Every main matrix is ``W_l = U · diag(σ_l) · Vᵀ`` with ``U``, ``V`` shared by the four
blocks (one pair per matrix kind) and rank 32 = hidden/4 (the FINE supplementary
uses 100 for DiT-B's 768 and 148 for DiT-L's 1024).  The trained ``fine_bases``
are the learngene: ``--config.init.fine_learngene=WORKDIR`` initialises a FINE
DiT of another depth, width or rank from them (``kindjax.transfer.fine``).
"""
from configs.dit_digits import get_config as dit_digits_config
from kindjax.layers.fine import fine_config


def get_config():
    config = dit_digits_config()
    config.model.linear = fine_config(rank=32)
    return config
