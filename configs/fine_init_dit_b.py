"""A FINE Table 1 target from DiT-B: ``configs/fine_init_dit_b.py:depth_8`` (L4, L6, L8, L10, L12) initialised from
the FINE pre-training (``--config.init.fine_learngene=WORKDIR`` of ``configs/fine_dit_b.py``), Σ-only stage,
then 100K steps; ``:depth_8,linear`` (or ``random``, ``identical``) sets Σ without the stage (Table 5);
``:depth_8,per_layer_svd`` is Table 4's "w/o Factorize" (``--config.init.pretrained=`` a dense DiT-B run).
See :func:`configs.fine_imagenet.fine_init_config`.
"""
from configs.fine_imagenet import fine_init_config


def get_config(spec: str = "depth_12"):
    return fine_init_config("B", spec)
