"""KIND DiT-L/2 on the KIND paper's ImageNet split, N_T = 4, N_G filling the rank to 1024.

``configs/kind_dit_l.py`` pre-trains on the training classes; ``configs/kind_dit_l.py:task_K`` transfers the
learngene to downstream task K, ``configs/kind_dit_l.py:task_K,lora`` runs a baseline there
(:func:`configs.imagenet_dit.kind_imagenet_config`). The paper: 150 classes, N_G = 424
(1024 = 150·4 + 424).
"""
from configs.imagenet_dit import kind_imagenet_config


def get_config(spec: str = ""):
    return kind_imagenet_config("L", n_tailor=4, spec=spec)
