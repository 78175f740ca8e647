"""Shared settings of the DiT ImageNet 256² latent configs (Peebles & Xie 2023, Table 4 setup).

Latent 32×32×4 (SD-VAE, factor 8), 1000 classes, batch 256, AdamW lr 1e-4 with no
weight decay, EMA 0.9999, learned sigma, DDPM sampling with 250 steps and CFG 1.5.
"""
from kindjax.config import base_config


def imagenet_config(arch: str, patch_size: int = 2):
    config = base_config()
    config.model.update(arch=arch, image_size=32, in_channels=4, patch_size=patch_size, num_classes=1000)
    config.data.update(name="imagenet")
    config.optim.update(lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    config.train.update(batch_size=256, num_steps=400_000, ema_decay=0.9999, log_every=100,
                        checkpoint_every=5000, sample_every=20_000)
    config.sample.update(sampler="ddpm", num_steps=250, cfg_scale=1.5, grid_per_class=1)
    config.eval.update(num_samples=50_000, batch_size=256)
    return config


def kind_imagenet_config(arch: str, n_learngene: int, n_tailor: int, num_classes: int = 150):
    """KIND pre-training as in the KIND paper: 150 training classes, rank
    num_classes·n_tailor + n_learngene = the hidden size."""
    from kindjax.layers.kind import kind_config

    config = imagenet_config(arch)
    config.model.num_classes = num_classes
    config.model.linear = kind_config(n_learngene=n_learngene, n_tailor=n_tailor, n_classes=num_classes)
    return config
