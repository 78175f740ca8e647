"""FINE pre-training of DiT-B/2 on ImageNet-1K 256² latents (supplementary Table 7): shared U, V per matrix
type (qkv, o, in, out, adaLN), rank 100, batch 64, 300K steps, AdamW lr 1e-4, drop path 0.5
(:mod:`configs.fine_imagenet`).  Its workdir is the learngene of ``configs/fine_init_dit_b.py``.
"""
from configs.fine_imagenet import fine_pretrain_config


def get_config():
    return fine_pretrain_config("B")
