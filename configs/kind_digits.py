"""KIND on the embedded digits: the README's main job (``configs/default.py``).

Pre-train a KIND DiT on digits 0–6 under the class gate for 2,400 steps (rank 128 = 7 classes × 8
tailor components + 72 learngene components), then transfer the frozen learngene to
the novel digits 7–9 with fresh tailors at the paper's lr 1e-3.  The report
(console and WORKDIR/metrics.json): kind_accuracy, learngene_only_entropy,
recombined_accuracy (learngene + tailors of digits 0, 3, 6 only), novel_accuracy,
novel_frechet_distance.
"""
from configs.dit_digits import get_config as dit_digits_config
from kindjax.papers.kind.layer import kind_config


def get_config():
    config = dit_digits_config()
    config.job = "kind_transfer"
    config.data.classes = (0, 1, 2, 3, 4, 5, 6)
    config.model.num_classes = 7
    config.train.num_steps = 2400
    config.model.linear = kind_config(n_learngene=72, n_tailor=8)
    config.transfer.update(classes=(7, 8, 9), num_steps=1000, lr=1e-3, recombine_classes=(0, 3, 6))
    return config
