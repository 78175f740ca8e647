"""The config schema: every key a kindjax config may have, with its default.

Config files (``configs/*.py``) start from :func:`base_config` and override.
:func:`validate` refuses unknown keys and impossible settings with a message that
names the key and the fix, before anything is compiled.  A package outside the core adds
its own keys and checks as an :class:`Extension` (:data:`EXTENSIONS`, filled on import:
:mod:`kindjax.registry`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from kindjax.archs import resolve_dims
from kindjax.registry import Registry
from kindjax.sharding import CLASS_ROW_REDUCTIONS

#: ``model.attention``: how attention is computed (:mod:`kindjax.models.attention`).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")
#: ``model.remat``: what a DiT block keeps for the backward pass (:func:`kindjax.models.dit.remat_policy`).
REMAT_POLICIES = ("none", "block", "dots_saveable")
#: ``eval.labels``: the class labels of the evaluation samples (:func:`kindjax.evaluation.pipeline.sample_labels`).
EVAL_LABELS = ("uniform", "balanced")
#: ``eval.fdd_normalize``: what each DINOv2 feature goes through before FDD's Fréchet distance
#: (:func:`kindjax.evaluation.dinov2.fdd`).
FDD_NORMALIZATIONS = ("l2", "none")
#: ``model.qkv_init``: how fresh q, k, v matrices are initialised (:data:`kindjax.layers.base.QKV_INITS`).
QKV_INITS = ("fused", "separate")
#: ``model`` keys that choose how the model is computed, never its parameters or (to rounding) its
#: values: a checkpoint resumes, and a finished stage stays finished, whatever they are.
EXECUTION_KEYS = ("attention", "remat", "scan_blocks")
#: ``eval.dinov2_model``: the DINOv2 of FDD (torch-hub names; :data:`kindjax.evaluation.dinov2.DINOV2_SIZES`).
#: "vitl14" is the FDD reference tool's default (dgm-eval, Stein et al. 2023: ``DINOv2Encoder`` loads
#: ``dinov2_vitl14`` when no ``--arch`` is given); "any" takes the weights directory's network unchecked.
DINOV2_MODELS = ("vits14", "vitb14", "vitl14", "any")


class ConfigError(ValueError):
    """A config that cannot run, with the key at fault and the fix in the message."""


@dataclasses.dataclass(frozen=True)
class Extension:
    """Keys a package adds to the schema and their checks.

    ``defaults``: dotted key → default (``"init.learngene": ""``; a whole new section as a dict);
    ``starts``: the ``init`` keys among them that name a checkpoint to start from (at most one start
    may be set; :func:`start_keys`); ``validate(config)``: raises :class:`ConfigError` on an
    impossible setting of those keys; ``unrecorded``: its sections that do not change what a training
    stage produces (left out of a stage's fingerprint, :func:`kindjax.train.stages.fingerprint`).
    """

    defaults: Mapping[str, Any]
    starts: tuple[str, ...] = ()
    validate: Callable[[ml_collections.ConfigDict], None] | None = None
    unrecorded: tuple[str, ...] = ()


#: The packages' :class:`Extension` s by name.
EXTENSIONS: Registry[Extension] = Registry("config extension")

#: The core's ``init`` key that names a checkpoint to start from (:mod:`kindjax.transfer.pretrained`).
CORE_STARTS = ("pretrained",)


def start_keys() -> tuple[str, ...]:
    """Every ``init`` key that names a checkpoint to start from: the core's and the extensions'."""
    return CORE_STARTS + tuple(k for e in EXTENSIONS.values() for k in e.starts)


def model_config() -> ml_collections.ConfigDict:
    """DiT hyper-parameters; ``arch`` (S/B/L/XL) overrides hidden_size/depth/num_heads."""
    return ml_collections.ConfigDict(dict(
        arch="",                  # "", "S", "B", "L" or "XL"
        hidden_size=128,
        depth=4,
        num_heads=4,
        image_size=8,             # input side (pixels, or latent side for latent models)
        in_channels=1,
        patch_size=2,
        num_classes=10,
        mlp_ratio=4.0,
        class_dropout=0.1,        # classifier-free guidance label dropout
        learn_sigma=True,         # output ε and the variance interpolation v
        adaln_init="zero",        # "zero" (adaLN-Zero) or "gaussian"
        adaln_std=(1e-3,),        # one std, or (α, γ, β) e.g. (8e-4, 1.2e-3, 8e-4)
        timestep_freq_shift=1.0,  # 1 as diffusers' DiT, 0 as the original DiT code
        norm_eps=1e-6,
        mlp_norm_eps=1e-6,        # eps of the LayerNorm before the MLP (diffusers' DiT: its norm_eps)
        dtype="float32",          # compute dtype: "float32" or "bfloat16" (params stay float32)
        attention="xla",          # "xla", "cudnn" (GPU), "pallas" (TPU splash) or "auto"
        remat="none",             # "none", "block" (recompute each block) or "dots_saveable" (keep matmul outputs)
        scan_blocks=False,        # one nn-scan over the identical blocks (same parameter layout as the loop)
        residual_scales=False,    # DiffFit: learned per-channel γ (init 1) on each block's two residual branches
        attention_scales=False,   # DiffFit: γ (init 1) on each block's q, k, v outputs (3d) and attention projection (d)
        output_scale=False,       # DiffFit: γ (init 1) on the final layer's output
        scale_blocks=0,           # the blocks' γ only in blocks 0..scale_blocks-1 (0: every block)
        drop_path=0.0,            # stochastic depth on each block's two residual branches, in training only
        qkv_init="fused",         # fresh q, k, v: thirds of one xavier d→3d matrix (variance 1/(2d), as the DiT
                                  # reference code), or "separate" d→d matrices (1/d); kindjax.layers.base
        linear=ml_collections.ConfigDict(dict(kind="dense")),
    ))


def base_config() -> ml_collections.ConfigDict:
    """All sections with their defaults (the paper's DiT training settings where they apply), the
    packages' :data:`EXTENSIONS` included."""
    config = core_config()
    for extension in EXTENSIONS.values():
        for key, default in extension.defaults.items():
            *sections, name = key.split(".")
            parent = config
            for section in sections:
                parent = parent[section]
            parent[name] = ml_collections.ConfigDict(default) if isinstance(default, dict) else default
    return config


def core_config() -> ml_collections.ConfigDict:
    """The core's sections and keys with their defaults."""
    return ml_collections.ConfigDict(dict(
        job="train",              # the job kindjax.main runs: "train", or one a package registers
                                  # (kindjax.train.stages.JOBS)
        model=model_config(),
        diffusion=dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02),
        data=dict(
            name="digits",        # "digits" (embedded), "folder", "latents"; "imagenet" (image source only)
            classes=(),           # subset of dataset classes to train on, relabelled 0..n-1; () = all
            root="",              # data directory for on-disk data sets (imagenet: the TFDS data_dir)
            seed=0,
            # Image sources (kindjax.data.open_image_source):
            split="train",        # imagenet: the TFDS split ("train", "validation", "train[:10%]", …)
            manual_dir="",        # imagenet: folder with ILSVRC2012_img_{train,val}.tar, to prepare TFDS once
            image_size=256,       # side of the centre-cropped images (folder in make_dataset: model.image_size)
            grouping="",          # "" (the data set's classes) or a registered grouping of ImageNet's classes
                                  # (kindjax.data.class_groups.GROUPINGS)
            task="",              # a grouping's task: "" (all its classes) or one of its tasks
            random_flip=True,     # data.name="folder": mirror each batch row with probability 1/2
            latents="",           # latent shards of this source (python -m kindjax.tools.encode): train on them
            # Latents (kindjax.data.latents): the data order's streams (0: the largest divisor of the batch
            # size ≤ 64; each process reads only its streams' shards), threads preparing batches, steps
            # placed on the devices ahead, bad shards ("error" or "skip": drop and count them), start-up
            # check ("sizes": headers, sizes, encode-time NaN flags; "full": also scan this process's shards).
            streams=0, workers=1, device_prefetch=2, bad_shards="error", verify_latents="sizes",
        ),
        optim=dict(lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, warmup_steps=0),
        train=dict(
            batch_size=256,
            num_steps=400_000,
            seed=0,
            ema_decay=0.9999,
            ema_warmup=False,     # decay_t = min(ema_decay, (1 + t) / (10 + t)) for short runs
            log_every=100,
            checkpoint_every=5000,
            keep_checkpoints=3,
            sample_every=10_000,
            trainable=(".*",),    # regexes on parameter paths; the rest is frozen
            freeze_learngene=False,  # keep the learngene bundle (kindjax.params) bit-identical
            max_nonfinite_steps=0,   # steps with a non-finite loss or grad norm skipped (not applied) before
                                     # the run stops; 0: the first one stops it (docs/reliability.md)
            max_update_ratio=1.0,    # an update with ‖Δθ‖ > this·‖θ‖ explodes: not applied, and the run stops
                                     # as on NaN, whatever max_nonfinite_steps says; 0: no limit
            # Output distillation: loss += weight·mean‖ε_student − ε_teacher‖² on the same x_t, t, y; the
            # teacher (a training workdir, EMA weights) is frozen and outside the optimizer.
            distill=dict(teacher="", weight=1.0),
            # The dtype the data-parallel gradient is reduced in across devices (kindjax.sharding:
            # "float32", as PyTorch DDP, or "bfloat16": half the bytes, bf16 sums of partial gradients).
            grad_reduce_dtype="float32",
            # Under a class gate, how a class-row leaf's gradient (tailors, label table) is summed across
            # devices (kindjax.sharding.CLASS_ROW_REDUCTIONS): "all_reduce" the whole leaf, "gather" only
            # the rows of each device's labels, "auto" = whichever moves fewer interconnect bytes.
            class_row_reduce="all_reduce",
            # JAX's persistent compilation cache (kindjax.train.stages.use_compilation_cache): "auto" =
            # WORKDIR/compilation_cache (or $JAX_COMPILATION_CACHE_DIR), a directory (local or gs://), "" = off.
            compilation_cache="auto",
        ),
        # Start from a pre-trained DiT (dense, or the learngene part of a factorised one;
        # kindjax.transfer.pretrained): shared leaves copied, linear kernels from its dense kernel.
        init=dict(pretrained="",
                  blocks=(),            # copy only these DiT blocks (() = all); see select
                  select="",            # "heur_lg" / "auto_lg": choose num_blocks blocks (kindjax.transfer.layer_selection)
                  num_blocks=0,
                  svd_components=0),    # >0: each kernel cut to this many random singular components
        mesh=dict(data=-1, fsdp=1,    # -1: all remaining devices
                  dcn_data=1),        # slices (TPU multislice) or nodes (GPU) the data axis spans: the
                                      # outer part of `data` crosses the slow network (kindjax.sharding)
        sample=dict(sampler="ddpm", num_steps=250, cfg_scale=1.5, ddim_eta=0.0, grid_per_class=4,
                    clip_denoised=False,    # True for pixel-space data in [-1, 1]
                    # CFG on "all" ε channels, or on the first N ("3": the original DiT code, whose
                    # published FIDs used it; the ImageNet latent configs' default).
                    guidance_channels="all"),
        # The metrics of the samples (kindjax.evaluation.metric): at the end of training (the digits: the
        # digits classifier's) and in python -m kindjax.evaluation (samples as an ADM .npz, then FID/sFID/IS/
        # precision/recall against `reference`, an ADM reference .npz; FDD with `dinov2_weights`).
        eval=dict(metrics=(),             # names of kindjax.evaluation.metrics.METRICS; () = the defaults
                  num_samples=500, batch_size=250,
                  seed=0,                 # sampling noise and labels
                  labels="uniform",       # sample labels: "uniform" draws (as DiT's sample_ddp.py) or "balanced"
                                          # (sample i gets class i mod num_classes); EVAL_LABELS
                  reference="",           # ADM reference batch: images arr_0 and/or mu, sigma, mu_s, sigma_s
                  inception_weights="",   # pytorch-fid pt_inception-2015-12-05-6726825d.pth, or its .npz
                  inception_preprocess="tf1",  # "tf1": the TF graph's resize, as ADM's evaluator (whose reference
                                               # statistics FIDs are compared with); or "pytorch_fid"
                  inception_batch_size=200,
                  dinov2_weights="",      # set: also FDD (Fréchet distance of DINOv2 features)
                  dinov2_model="vitl14",  # the DINOv2 those weights must be (DINOV2_MODELS; dgm-eval's default)
                  fdd_normalize="l2",     # FDD on unit-L2-norm features ("l2", dgm-eval's normalized=True) or
                                          # "none" (raw); FDD_NORMALIZATIONS
                  feature_dtype="float32"),  # compute dtype of the Inception and DINOv2 forward passes
        # SD-VAE latents (kindjax.tools.encode writes them, data.name="latents" reads them from data.root).
        vae=dict(weights="",            # diffusers AutoencoderKL directory (config.json + safetensors)
                 scale=0.18215,         # training latents are scale·(mean + std·ε)
                 encode_batch_size=64,  # images per device step of the encode (a multiple of the devices)
                 shard_size=4096,       # source images per latent shard file
                 flips=True,            # also keep the mirrored image's moments (for data.random_flip)
                 dtype="float16",       # stored moments: float16 (half of float32's disk), bfloat16, float32
                 prefetch=2,            # local batches prepared ahead by the latent loader's thread
                 compute_dtype="float32"),  # compute dtype of the VAE's encode/decode (params stay float32)
    ))


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict) and k != "linear":
            keys |= _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def _wrong_types(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """``key: value (type), expected type`` for each value whose type is not its default's (an int is
    accepted for a float, a list for a tuple)."""
    found = []
    for k, default in schema.items():
        if k not in cfg or k == "linear":
            continue
        value = cfg[k]
        if isinstance(default, ml_collections.ConfigDict):
            found += _wrong_types(value, default, f"{prefix}{k}.") if isinstance(value, ml_collections.ConfigDict) \
                else [f"{prefix}{k}={value!r} is not a section"]
            continue
        expected = (tuple, list) if isinstance(default, (tuple, list)) else \
            (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
            found.append(f"{prefix}{k}={value!r} is a {type(value).__name__}, expected a {type(default).__name__} "
                         f"(default {default!r})")
        elif isinstance(default, tuple) and default:
            item = (int, float) if isinstance(default[0], float) else type(default[0])
            if not all(isinstance(v, item) for v in value):
                found.append(f"{prefix}{k}={tuple(value)!r} must hold {type(default[0]).__name__} values "
                             f"(default {default!r})")
    return found


def differences(before: Mapping, after: Mapping, labels: tuple[str, str] = ("", ""),
                prefix: str = "") -> list[str]:
    """``key: <labels[0]>a vs <labels[1]>b`` for each leaf where two nested config dicts differ
    (nested keys joined with dots after ``prefix``), in key order."""
    found = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += differences(a, b, labels, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}: {labels[0]}{a!r} vs {labels[1]}{b!r}")
    return found


def with_defaults(saved: Mapping, defaults: Mapping) -> dict:
    """``saved`` (a config as JSON, written earlier) with each key it lacks taken from ``defaults``, at
    every level: a key the schema added since reads as its default, so an old run compares equal to
    a config that leaves the new key at its default."""
    filled = dict(saved)
    for k, default in defaults.items():
        if k not in filled:
            filled[k] = default
        elif isinstance(default, Mapping) and isinstance(filled[k], Mapping):
            filled[k] = with_defaults(filled[k], default)
    return filled


def require(ok: bool, message: str) -> None:
    """Raises :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks ``config`` before anything is built or compiled; raises :class:`ConfigError`.

    ``model.linear`` keys are the chosen variant's and are checked when the model is traced.
    """
    unknown = sorted(_flat_keys(config) - _flat_keys(base_config()))
    require(not unknown, f"unknown config keys {unknown}; the known keys and their defaults are in "
                          f"kindjax/config.py (a typo?)")
    wrong = _wrong_types(config, base_config())
    require(not wrong, "; ".join(wrong))
    m, t, o = config.model, config.train, config.optim
    require(m.arch in ("", "S", "B", "L", "XL"), f"model.arch={m.arch!r}: use '', 'S', 'B', 'L' or 'XL'")
    dims = resolve_dims(m)
    require(dims.hidden_size % dims.num_heads == 0,
             f"the hidden size {dims.hidden_size} is not divisible by the {dims.num_heads} heads "
             f"(model.hidden_size / model.num_heads)")
    require(m.image_size % m.patch_size == 0,
             f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}")
    require(m.adaln_init in ("zero", "gaussian"), f"model.adaln_init={m.adaln_init!r}: use 'zero' or 'gaussian'")
    require(len(m.adaln_std) in (1, 3), f"model.adaln_std={tuple(m.adaln_std)}: give 1 std or 3 (α, γ, β)")
    require(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'")
    require(m.attention in ATTENTION_IMPLEMENTATIONS,
             f"model.attention={m.attention!r}: use one of {list(ATTENTION_IMPLEMENTATIONS)}")
    require(m.attention != "cudnn" or m.dtype == "bfloat16",
             "model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN flash attention takes bf16/fp16)")
    require(0 <= m.scale_blocks <= dims.depth, f"model.scale_blocks={m.scale_blocks} must be in [0, the depth "
                                                 f"{dims.depth}] (0: the blocks' γ in every block)")
    require(m.qkv_init in QKV_INITS, f"model.qkv_init={m.qkv_init!r}: use one of {list(QKV_INITS)}")
    require(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: use one of {list(REMAT_POLICIES)}")
    for key in ("vae.compute_dtype", "eval.feature_dtype"):
        section, name = key.split(".")
        require(config[section][name] in ("float32", "bfloat16"),
                 f"{key}={config[section][name]!r}: use 'float32' or 'bfloat16'")
    require(config.eval.dinov2_model in DINOV2_MODELS,
             f"eval.dinov2_model={config.eval.dinov2_model!r}: use one of {list(DINOV2_MODELS)} ('vitl14', "
             f"ViT-L/14, is the FDD reference dgm-eval's default; 'vitg14' is not supported: SwiGLU MLP)")
    require(config.eval.labels in EVAL_LABELS, f"eval.labels={config.eval.labels!r}: use one of {list(EVAL_LABELS)}")
    require(config.eval.fdd_normalize in FDD_NORMALIZATIONS,
            f"eval.fdd_normalize={config.eval.fdd_normalize!r}: use one of {list(FDD_NORMALIZATIONS)}")
    require(0.0 <= m.class_dropout < 1.0, f"model.class_dropout={m.class_dropout} must be in [0, 1)")
    require(t.batch_size > 0 and t.batch_size % num_devices == 0,
             f"train.batch_size={t.batch_size} is not divisible by the {num_devices} devices of the mesh "
             f"(data×fsdp); use a multiple of {num_devices}")
    require(config.mesh.dcn_data >= 1 and (config.mesh.data == -1 or config.mesh.data % config.mesh.dcn_data == 0),
             f"mesh.dcn_data={config.mesh.dcn_data} must be ≥ 1 and divide mesh.data={config.mesh.data} "
             f"(the number of slices or nodes): set mesh.data to a multiple of it, e.g. "
             f"--config.mesh.data={config.mesh.dcn_data}")
    require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    require(t.num_steps >= 0, f"train.num_steps={t.num_steps} must be ≥ 0 (0: nothing is trained, the workdir's "
                               f"step-0 checkpoint is the model, e.g. one assembled from parts of another)")
    for key in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints"):
        require(t[key] > 0, f"train.{key}={t[key]} must be positive")
    require(t.grad_reduce_dtype in ("float32", "bfloat16"),
            f"train.grad_reduce_dtype={t.grad_reduce_dtype!r}: use 'float32' or 'bfloat16'")
    require(t.get("class_row_reduce", "all_reduce") in CLASS_ROW_REDUCTIONS,
            f"train.class_row_reduce={t.get('class_row_reduce')!r}: use one of {list(CLASS_ROW_REDUCTIONS)}")
    require(t.max_nonfinite_steps >= 0, f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be ≥ 0")
    require(t.max_update_ratio >= 0, f"train.max_update_ratio={t.max_update_ratio} must be ≥ 0 (0: no limit)")
    require(o.lr > 0, f"optim.lr={o.lr} must be positive")
    require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be ≥ 0")
    require(config.sample.sampler in ("ddpm", "ddim"),
             f"sample.sampler={config.sample.sampler!r}: use 'ddpm' or 'ddim'")
    g = str(config.sample.guidance_channels)
    require(g == "all" or (g.isdigit() and 1 <= int(g) <= m.in_channels),
             f"sample.guidance_channels={g!r}: use 'all', or the number of leading channels to guide, "
             f"1..model.in_channels={m.in_channels} ('3' as the original DiT)")
    d = config.data
    require(d.bad_shards in ("error", "skip"), f"data.bad_shards={d.bad_shards!r}: use 'error' or 'skip'")
    require(d.verify_latents in ("sizes", "full"), f"data.verify_latents={d.verify_latents!r}: use 'sizes' or 'full'")
    for key, low in (("streams", 0), ("workers", 1), ("device_prefetch", 1)):
        require(d[key] >= low, f"data.{key}={d[key]} must be ≥ {low}")
    require(0 < config.sample.num_steps <= config.diffusion.num_timesteps,
             f"sample.num_steps={config.sample.num_steps} must be in [1, diffusion.num_timesteps="
             f"{config.diffusion.num_timesteps}]")
    require(0.0 <= m.drop_path < 1.0, f"model.drop_path={m.drop_path} must be in [0, 1)")
    i = config.init
    starts = [k for k in start_keys() if i[k]]
    require(len(starts) <= 1, f"init.{' and init.'.join(starts)} are different starts: set one of them")
    dist = t.distill
    require(dist.weight >= 0, f"train.distill.weight={dist.weight} must be ≥ 0")
    require(not dist.teacher or dist.weight > 0,
             "train.distill.teacher is set but train.distill.weight=0: give a positive weight or clear the teacher")
    if i.select or i.blocks or i.svd_components:
        require(bool(i.pretrained), "init.select / init.blocks / init.svd_components need init.pretrained "
                                     "(the pre-trained DiT to copy from)")
    classes = tuple(config.data.classes)
    if classes:
        require(len(classes) == m.num_classes,
                 f"data.classes has {len(classes)} classes but model.num_classes={m.num_classes}; "
                 f"set model.num_classes={len(classes)}")
    for extension in EXTENSIONS.values():
        if extension.validate is not None:
            extension.validate(config)
