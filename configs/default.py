"""The README's main job: KIND on the embedded digits (``configs/kind_digits.py``) on the
budget of a first run — at most 8 minutes on a 2-core CPU:

- 1,200 pre-training steps and 500 transfer steps (``kind_digits``: 2,400 and 1,000) at
  batch 64 (128): the digits' figures are already at their ceiling there (README);
- the evaluation and sample grids with 50 DDPM steps (100).

``configs/kind_digits.py`` is the longer run; the dense DiT on the same data is
``configs/dit_digits.py``.
"""
from configs.kind_digits import get_config as kind_digits_config


def get_config():
    config = kind_digits_config()
    config.train.batch_size = 64
    config.train.num_steps = 1200
    config.transfer.num_steps = 500
    config.sample.num_steps = 50
    return config
