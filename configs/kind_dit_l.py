"""KIND DiT-L/2 on the KIND paper's ImageNet split, the paper's N_T, N_G filling the rank to 1024.

``configs/kind_dit_l.py`` pre-trains on the training classes; ``configs/kind_dit_l.py:task_K`` transfers the
learngene to downstream task K, ``configs/kind_dit_l.py:task_K,lora`` runs a baseline there
(:func:`configs.imagenet_dit.kind_imagenet_config`; the paper's sizes: :mod:`kindjax.papers.kind.facts`).
"""
from configs.imagenet_dit import kind_imagenet_config


def get_config(spec: str = ""):
    return kind_imagenet_config("L", spec=spec)
