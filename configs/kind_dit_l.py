"""KIND DiT-L/2 as in the KIND paper: N_G = 424, N_T = 4, 150 classes (1024 = 150·4 + 424)."""
from configs.imagenet_dit import kind_imagenet_config


def get_config():
    return kind_imagenet_config("L", n_learngene=424, n_tailor=4)
