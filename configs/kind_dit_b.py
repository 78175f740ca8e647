"""KIND DiT-B/2 on the KIND paper's ImageNet split, N_T = 3, N_G filling the rank to 768.

``configs/kind_dit_b.py`` pre-trains on the training classes; ``configs/kind_dit_b.py:task_K`` transfers the
learngene to downstream task K, ``configs/kind_dit_b.py:task_K,lora`` runs a baseline there
(:func:`configs.imagenet_dit.kind_imagenet_config`). The paper: 150 classes, N_G = 318
(768 = 150·3 + 318).
"""
from configs.imagenet_dit import kind_imagenet_config


def get_config(spec: str = ""):
    return kind_imagenet_config("B", n_tailor=3, spec=spec)
