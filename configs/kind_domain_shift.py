"""KIND Table 3: transfer to a data set with a large domain shift (an image folder), FDD as the metric.

``configs/kind_domain_shift.py:DATASET[,METHOD][,B|L][,classes=N]``, e.g. ``:celebahq`` (KIND, DiT-B),
``:mri,lora,L``, ``:pokemon,kind,classes=18``. DATASET is one of the paper's four (CelebA-HQ, Hubble, MRI,
Pokémon: ``celebahq``, ``hubble``, ``mri``, ``pokemon``) or FINE's LSUN sets; set ``data.root`` to the
folder and ``data.latents`` to its encoded latents (:mod:`configs.downstream_data`).

- ``kind`` (default): the KIND learngene of ``init.learngene`` (the ``configs/kind_dit_b.py`` /
  ``kind_dit_l.py`` pre-training workdir) frozen, fresh tailors, lr 1e-3 (§3.3, Figure 3b).
  A folder without classes (``classes=1``) gets **one tailor set**: every real image is class 0, so the
  class gate routes all of them through learngene + that tailor; the images that classifier-free
  guidance's label dropout (10%) turns into the null class use the frozen learngene alone and so update
  nothing. Sampling with CFG then extrapolates from the learngene-only prediction towards the one with
  the tailor: the tailor is the whole domain-specific part.
- a baseline of Table 3 (:data:`kindjax.papers.kind.facts.TABLE3_METHODS`; or any of :data:`kindjax.papers.kind.methods.METHODS`) from a dense DiT
  (``init.pretrained``), at KIND's matched size (:func:`kindjax.papers.kind.methods.matched_sizes`: rank
  ``N·N_T`` for ``N`` classes, LoHa half of it, OFT blocks of 32 channels as peft's default since
  Table 7's block numbers are per ImageNet task), with Table 7's learning rates and batch sizes.

Steps: the paper gives none for Table 3; Table 7's 50K (every downstream method) is used.
Evaluation: FDD (``eval.dinov2_weights``; DINOv2 ViT-L/14, dgm-eval's default, ``eval.dinov2_model``)
against the folder's real images (``python -m kindjax.evaluation.reference``).

The whole table is one sweep (:mod:`kindjax.papers.kind.experiments.domain_shift`): give the spec without a data set,
``configs/kind_domain_shift.py:,L`` (``:,B,classes=4``; no spec: DiT-B, one class), and the data sets with
``--tasks``. The config is the same for every data set (the data set only names the folder).
"""
from configs.downstream_data import DATASETS, folder_data, parse_spec
from configs.imagenet_dit import imagenet_config, kind_imagenet_config

def get_config(spec: str = "celebahq"):
    from kindjax.archs import resolve_dims
    from kindjax.papers.kind import facts
    from kindjax.papers.kind.methods import METHODS, matched_sizes, method_config

    # "" (e.g. ":,L"): no data set, the sweep's config (python -m kindjax.sweep --tasks names the data sets).
    _, chosen, classes = parse_spec(spec, (*DATASETS, ""), {"method": tuple(METHODS), "arch": tuple(facts.N_TAILOR)},
                                    {"method": "kind", "arch": "B"}, "configs/kind_domain_shift.py:mri,lora,L")
    arch, method = chosen["arch"], chosen["method"]
    pretrain = kind_imagenet_config(arch)     # its N_G, N_T: the learngene's shapes
    linear, dims = pretrain.model.linear, resolve_dims(pretrain.model)
    config = folder_data(imagenet_config(arch), classes)
    config.train.num_steps = facts.TRANSFER_STEPS
    sizes = matched_sizes(classes, linear.n_learngene, linear.n_tailor, dims.hidden_size, dims.depth)
    return method_config(config, method, sizes)
