"""KIND DiT-B/2 as in the KIND paper: N_G = 318, N_T = 3, 150 classes (768 = 150·3 + 318)."""
from configs.imagenet_dit import kind_imagenet_config


def get_config():
    return kind_imagenet_config("B", n_learngene=318, n_tailor=3)
