"""KIND DiT-L/2 pre-training as in the KIND paper: ImageNet latents, 150 training
classes, N_G = 424 learngene and N_T = 4 tailor components per class
(rank 150·4 + 424 = hidden size)."""
from configs.imagenet_dit import imagenet_config
from kindjax.layers.kind import kind_config


def get_config():
    config = imagenet_config("L")
    config.model.num_classes = 150
    config.model.linear = kind_config(n_learngene=424, n_tailor=4, n_classes=150)
    return config
