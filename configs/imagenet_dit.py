"""Shared settings of the DiT ImageNet 256² latent configs (Peebles & Xie 2023, Table 4 setup).

Latent 32×32×4 (SD-VAE, factor 8), 1000 classes, batch 256, AdamW lr 1e-4 with no
weight decay, EMA 0.9999, learned sigma, DDPM sampling with 250 steps and CFG 1.5 on the
first three latent channels (``sample.guidance_channels="3"``, as the original DiT code,
with which DiT's published FIDs were measured).
"""
from kindjax.config import base_config


def imagenet_config(arch: str, patch_size: int = 2):
    config = base_config()
    # bf16 compute (parameters, optimizer state and EMA stay f32), as DiT trainers in the field do;
    # attention by the devices (splash on a TPU, cuDNN on a GPU), no remat, no scan: what the pre-flight
    # shows fits and is fastest on v5p-8 (docs/benchmarks.md, "Pre-flight"; docs/pods.md for v4/v5e).
    config.model.update(arch=arch, image_size=32, in_channels=4, patch_size=patch_size, num_classes=1000,
                        dtype="bfloat16", attention="auto", remat="none", scan_blocks=False)
    config.data.update(name="imagenet")
    config.optim.update(lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    config.train.update(batch_size=256, num_steps=400_000, ema_decay=0.9999, log_every=100,
                        checkpoint_every=5000, sample_every=20_000)
    config.sample.update(sampler="ddpm", num_steps=250, cfg_scale=1.5, guidance_channels="3", grid_per_class=1)
    config.eval.update(num_samples=50_000, batch_size=256)
    return config


def kind_imagenet_config(arch: str, spec: str = ""):
    """KIND on the KIND paper's ImageNet split (``data.grouping="kind"``), selected by ``spec``:

    - ``""``: pre-training on the training classes (``data.task="pretrain"``) under the class gate,
      :data:`kindjax.papers.kind.facts.PRETRAIN_STEPS` steps (§4.2);
    - ``"task_K"``: KIND on downstream task K (Table 9): the frozen learngene of ``init.learngene``
      (set it to the pre-training workdir) with fresh tailors, at Table 7's learning rate and steps;
    - ``"task_K,METHOD"``: a baseline of :data:`kindjax.papers.kind.methods.METHODS` on task K at Table 7's
      size (:func:`kindjax.papers.kind.methods.kind_task_sizes`: rank ``N_T·c``, LoHa ``⌊N_T·c/2⌋``, Table 7's
      OFT blocks); set ``init.pretrained`` to a dense DiT run.

    ``N_T`` is the paper's (:data:`kindjax.papers.kind.facts.N_TAILOR`); ``N_G`` fills the rank to the
    hidden size, ``N_cls·N_T + N_G = hidden`` with ``N_cls`` the training classes of the shipped tables.
    The paper has :data:`~kindjax.papers.kind.facts.PRETRAIN_CLASSES` classes (its N_G:
    :data:`~kindjax.papers.kind.facts.N_LEARNGENE`); the tables as extracted give 157, hence N_G 297 (B)
    and 396 (L): see :mod:`kindjax.papers.kind.classes`.
    """
    from kindjax.archs import resolve_dims
    from kindjax.papers.kind import facts
    from kindjax.papers.kind.classes import kind_pretrain_classes, kind_tasks
    from kindjax.papers.kind.layer import kind_config
    from kindjax.papers.kind.methods import METHODS, kind_task_sizes, method_config

    config = imagenet_config(arch)
    dims, n_tailor = resolve_dims(config.model), facts.N_TAILOR[arch]
    n_pretrain = len(kind_pretrain_classes())
    n_learngene = dims.hidden_size - n_pretrain * n_tailor
    task, _, method = spec.partition(",")
    if not task:
        config.data.update(grouping="kind", task="pretrain")
        config.model.num_classes = n_pretrain
        config.train.num_steps = facts.PRETRAIN_STEPS
        config.transfer.num_steps = facts.TRANSFER_STEPS   # the downstream runs of python -m kindjax.sweep
        # ``auto``: the grouped formulation on a TPU, the gated one elsewhere; DiT-L's train state split
        # over the devices (FSDP): what the pre-flight shows cheapest on v5p-8 (docs/benchmarks.md, "KIND's
        # step beside the dense DiT's").  Neither changes the values computed (up to rounding), only how.
        config.model.linear = kind_config(n_learngene=n_learngene, n_tailor=n_tailor, formulation="auto")
        if arch == "L":
            config.mesh.update(data=1, fsdp=-1)
        return config
    if task not in kind_tasks():
        raise ValueError(f"config spec {spec!r}: the task is one of task_1..task_18 (KIND Table 9), "
                         f"e.g. configs/kind_dit_b.py:task_3 or configs/kind_dit_b.py:task_3,lora")
    method = method or "kind"
    if method not in METHODS:
        raise ValueError(f"config spec {spec!r}: unknown method {method!r}; use one of {sorted(METHODS)}")
    classes, sizes = kind_task_sizes(task, n_learngene, n_tailor, dims.hidden_size, dims.depth)
    config.data.update(grouping="kind", task=task)
    config.model.num_classes = classes
    config.train.num_steps = facts.TRANSFER_STEPS
    return method_config(config, method, sizes)
