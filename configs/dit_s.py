"""DiT-S/2 on ImageNet 256² latents (32×32×4), the paper's training settings."""
from configs.imagenet_dit import imagenet_config


def get_config():
    return imagenet_config("S")
