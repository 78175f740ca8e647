"""FINE's downstream data sets (supplementary Tables 6 and 8) as image-folder configs.

``configs/fine_downstream.py:DATASET[,B|L][,fine|dense][,classes=N]``, e.g. ``:celebahq`` (DiT-B, FINE
layers), ``:church,L``, ``:mri,dense``. DATASET: ``celebahq``, ``bedroom``, ``church`` (natural images:
FID), ``hubble``, ``mri``, ``pokemon`` (FDD: ``eval.dinov2_weights``, DINOv2 ViT-L/14 by default); set
``data.root`` and ``data.latents`` as :mod:`configs.downstream_data` says.

Table 8, every set: batch 64, lr 1e-4, AdamW (weight decay 0, as Table 7), drop path 0.1, "drop last"
(kindjax's batches are always full), steps CelebA-HQ 100K, LSUN Bedroom and Church 150K, Hubble, MRI
and Pokémon 20K. The model:

- ``fine`` (default): FINE layers of rank "sigma share" (Table 7: B 100, L 148, read as the shared
  rank r), initialised from a FINE learngene: set ``init.fine_learngene`` to the FINE ImageNet
  pre-training workdir. As FINE's main text says ("light retraining of Σ on limited data" with U, V
  frozen, then fine-tuning), ``job="fine_init"`` first trains only the per-layer Σ on the downstream
  data (``init.sigma_batches`` batches, ``init.sigma_steps`` steps), from random Σ as FINE's notes
  describe ("Σ_tgt is randomly initialised and then optimised alone"; ``init.sigma_start="copy"``
  starts from the source's own per-layer Σ instead: same depth), then trains everything, FINE layers
  kept factorized (``init.materialize=False``). Every block thus starts with its own Σ, not the mean
  (``init.fine_sigma="identical"``, the other starts' default, gives every block the same).
- ``dense``: a plain DiT (from scratch, or ``--config.init.pretrained=DIR``).

Table 8's drop path 0.1 is ``model.drop_path``.
"""
from configs.downstream_data import DATASETS, folder_data, parse_spec
from configs.imagenet_dit import imagenet_config



def get_config(spec: str = "celebahq"):
    from kindjax.papers.fine import facts
    from kindjax.papers.fine.layer import fine_config

    dataset, chosen, classes = parse_spec(spec, tuple(DATASETS), {"arch": tuple(facts.RANK), "model": ("fine", "dense")},
                                          {"arch": "B", "model": "fine"}, "configs/fine_downstream.py:church,L")
    arch = chosen["arch"]
    config = folder_data(imagenet_config(arch), classes)
    config.train.update(batch_size=64, num_steps=DATASETS[dataset].fine_steps)
    config.optim.update(lr=1e-4, weight_decay=0.0)
    config.model.drop_path = facts.DOWNSTREAM_DROP_PATH
    if chosen["model"] == "fine":
        config.model.linear = fine_config(rank=facts.RANK[arch])
        config.job = "fine_init"
        config.init.update(fine_sigma="trained", sigma_start="random", materialize=False)
    return config
