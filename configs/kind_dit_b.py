"""KIND DiT-B/2 pre-training as in the KIND paper: ImageNet latents, 150 training
classes, N_G = 318 learngene and N_T = 3 tailor components per class
(rank 150·3 + 318 = hidden size)."""
from configs.imagenet_dit import imagenet_config
from kindjax.layers.kind import kind_config


def get_config():
    config = imagenet_config("B")
    config.model.num_classes = 150
    config.model.linear = kind_config(n_learngene=318, n_tailor=3, n_classes=150)
    return config
