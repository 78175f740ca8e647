"""FINE's Table 1 in miniature on the embedded digits (``python -m kindjax.sweep``, experiment
``fine_depths``, :mod:`kindjax.papers.fine.experiments.depths`), sized for a 2-core CPU.

The sources (FINE, dense and TLEG DiTs of ``configs/fine_digits.py``: depth 4, hidden 128, FINE
rank 32, all ten digits) pre-train ``train.num_steps`` = 1,200 steps at batch 64 (the default
job's pre-training budget); every target of depth 1, 2, 3, 6 or 8 then trains
``transfer.num_steps`` = 150 steps at batch 64 after its initialisation, the same short budget
for every initialiser. FINE's Σ-only stage: 50 steps (``init.sigma_steps``; the paper's ~0.3K
would be twice this whole budget) on the whole digits set (``init.sigma_batches=0``: the
"limited data" of the paper is moot on 1,797 images); LiGO's coefficient run: 100 steps.
Evaluation: 200 EMA samples, 50 DDPM steps, CFG 2.
"""
from configs.fine_digits import get_config as fine_digits_config


def get_config():
    config = fine_digits_config()
    config.train.batch_size = 64
    config.train.num_steps = 1200
    config.transfer.num_steps = 150
    config.init.update(sigma_steps=50, sigma_batches=0)
    config.train.sample_every = config.train.num_steps
    config.sample.num_steps = 50
    config.eval.update(num_samples=200, batch_size=200)
    return config
