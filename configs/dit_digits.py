"""Dense class-conditional DiT on the embedded digits (8×8, 10 classes), pixel space.

Runs on a 2-core CPU in a few minutes and ends with a sample grid and
``metrics.json`` (sample_accuracy, frechet_distance from the digits evaluator).
"""
from kindjax.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.image_size, m.in_channels, m.patch_size, m.num_classes = 8, 1, 2, 10
    m.hidden_size, m.depth, m.num_heads = 128, 4, 4
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    t = config.train
    t.batch_size, t.num_steps, t.ema_decay, t.ema_warmup = 128, 3000, 0.999, True
    t.log_every, t.checkpoint_every, t.sample_every = 100, 500, 1000
    config.sample.update(sampler="ddpm", num_steps=100, cfg_scale=2.0, grid_per_class=10,
                         clip_denoised=True)
    config.eval.update(num_samples=500, batch_size=500)
    return config
