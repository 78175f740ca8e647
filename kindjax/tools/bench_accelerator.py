"""Accelerator benchmark: ``python -m kindjax.tools.bench --suite accelerator [--accel_torch]``.

On all devices of the host (one ``data`` mesh over ``jax.local_devices()``), with the trainer's own
jitted, sharded step (:class:`kindjax.train.trainer.Trainer`) on random latents and classes:

- DiT-XL/2 (256² images as 32×32×4 latents), bf16, at 32 and 64 images per device: seconds per
  step over ``--accel_steps`` back-to-back steps (dispatched without waiting, timed to the last one's
  completion), images/s, and MFU = 3 × :func:`forward_flops` (XLA's count of the unrolled forward
  pass) / (step time × devices × the chip's peak dense bf16 FLOP/s, :data:`PEAK_BF16_FLOPS`); also
  XLA's count of the whole step (backward and optimizer included; it counts any rematerialised work,
  so ``xla_step_tflop`` / step time is the hardware FLOP rate, but a ``model.scan_blocks`` body only
  once), the compile time and XLA's memory analysis per device.
  A batch that does not fit is reported as such, not fatal.
- KIND-L/2 (gated class gate, the paper's N_G = 424, N_T = 4, 150 classes) over dense DiT-L/2 with
  the same 150 classes, 32 per device, measured alternately ``rounds`` times: ``kind_over_dense``.
- 250-step DDPM sampling with classifier-free guidance (scale 1.5: two forward passes per step) of
  DiT-XL/2, 32 images per device: images/s.
- ``--accel_torch`` (opt-in): diffusers' PyTorch DiT-XL/2 train step (``kindjax.tools.bench``'s) at 32
  images on one device, bf16 autocast.

``--accel_size tiny`` swaps every model for a one-block 32-wide DiT on 8×8 inputs, so the same
code runs on a CPU in seconds (the tests do). ``--accel_set model.key=value`` (repeatable) sets a
model key on every benchmarked model (e.g. an attention or remat setting). The last line printed is
the figures as one JSON object.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from kindjax import sharding
from kindjax.archs import resolve_dims
from kindjax.config import base_config, validate
from kindjax.diffusion import sample as run_sampler
from kindjax.papers.kind import facts as kind_facts
from kindjax.papers.kind.layer import kind_config
from kindjax.models.dit import DiT, unrolled
from kindjax.train.trainer import Trainer

#: Peak dense bf16 FLOP/s by a substring of ``jax.Device.device_kind`` (first match wins; TPU v5e
#: and v6e call themselves "TPU v5 lite" / "TPU v6 lite", v5p "TPU v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("B200", 2250e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))

TorchStep = Callable[[ml_collections.ConfigDict], tuple[Callable[[], None], int]]


def peak_flops(device: jax.Device) -> float | None:
    """The chip's peak dense bf16 FLOP/s, or None for CPUs and unknown chips."""
    if device.platform == "cpu":
        return None
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device.device_kind), None)


def forward_flops(model: DiT, param_shapes: Any, batch: int) -> float:
    """FLOPs (2 per multiply-add) of one forward pass on ``batch`` images, from XLA's cost analysis of
    :func:`kindjax.models.dit.unrolled` ``(model)``.

    Counts every matmul and attention product, plus the (small) elementwise work of norms,
    activations and softmax, whatever ``model.scan_blocks`` and ``model.attention`` are.
    """
    x = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, model.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    lowered = jax.jit(unrolled(model).apply).lower({"params": param_shapes}, x, labels, labels)
    return float(lowered.cost_analysis()["flops"])


@dataclasses.dataclass(frozen=True)
class Options:
    """What to benchmark (:data:`FULL` and :data:`TINY`; the flags pick one and adjust it)."""

    arch: str = "XL"                        # the train-step and sampling model
    kind_arch: str = "L"                    # the KIND-over-dense pair
    image_size: int = 32
    channels: int = 4
    patch: int = 2
    num_classes: int = 1000
    dtype: str = "bfloat16"
    batches: tuple[int, ...] = (32, 64)     # images per device
    steps: int = 10                         # back-to-back timed steps
    warmup: int = 2                         # untimed steps after the compile
    kind_batch: int = 32
    kind_num_classes: int = kind_facts.PRETRAIN_CLASSES
    kind_tailor: int = kind_facts.N_TAILOR["L"]
    kind_learngene: int = kind_facts.N_LEARNGENE["L"]
    rounds: int = 3                         # dense, KIND alternations
    sample_steps: int = 250
    sample_batch: int = 32
    overrides: tuple[str, ...] = ()         # "model.key=value" on every model
    torch: bool = False


FULL = Options()
TINY = Options(arch="", kind_arch="", image_size=8, num_classes=10, batches=(2, 4), steps=2, warmup=1,
               kind_batch=2, kind_num_classes=4, kind_tailor=2, kind_learngene=24, rounds=2, sample_steps=3,
               sample_batch=2, overrides=("model.hidden_size=32", "model.depth=1", "model.num_heads=2"))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The suite's flags (defined only when ``kindjax.tools.bench`` runs as a program, or by a test)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("accel_size", "full", ["full", "tiny"], "full: DiT-XL/2 and L/2; tiny: a CPU-sized DiT.", **fv)
    flags.DEFINE_integer("accel_steps", None, "Back-to-back timed train steps (default: the size's).", **fv)
    flags.DEFINE_integer("accel_sample_steps", None, "Sampling steps (default: 250; tiny: 3).", **fv)
    flags.DEFINE_bool("accel_torch", False, "Also time diffusers' PyTorch DiT train step (opt-in).", **fv)
    flags.DEFINE_multi_string("accel_set", [], "model.key=value set on every benchmarked model.", **fv)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Options:
    """The :class:`Options` the parsed flags of :func:`define_flags` give."""
    options = TINY if flag_values["accel_size"].value == "tiny" else FULL
    changes: dict[str, Any] = {"torch": flag_values["accel_torch"].value,
                               "overrides": options.overrides + tuple(flag_values["accel_set"].value)}
    if flag_values["accel_steps"].value is not None:
        changes["steps"] = flag_values["accel_steps"].value
    if flag_values["accel_sample_steps"].value is not None:
        changes["sample_steps"] = flag_values["accel_sample_steps"].value
    return dataclasses.replace(options, **changes)


def apply_overrides(config: ml_collections.ConfigDict, overrides: tuple[str, ...]) -> None:
    """Sets each ``key.path=value`` (a Python literal, else a string) in ``config``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not sep or not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"--accel_set {item!r}: give key=value with a config key (see kindjax/config.py)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config.update_from_flattened_dict({key: value})


def model_config(options: Options, arch: str, per_device_batch: int, num_devices: int, num_classes: int,
                 linear: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The full config of one benchmarked model, its global batch split over ``num_devices``."""
    config = base_config()
    config.model.update(dict(arch=arch, image_size=options.image_size, in_channels=options.channels,
                             patch_size=options.patch, num_classes=num_classes, dtype=options.dtype))
    if linear is not None:
        config.model.linear = linear
    apply_overrides(config, options.overrides)
    config.train.batch_size = per_device_batch * num_devices
    validate(config, num_devices)
    return config


def model_name(config: ml_collections.ConfigDict) -> str:
    m = config.model
    dims = resolve_dims(m)
    size = f"DiT-{m.arch}" if m.arch else f"DiT({dims.hidden_size}x{dims.depth}x{dims.num_heads})"
    return f"{'KIND-' if m.linear.kind == 'kind' else ''}{size}/{m.patch_size}"


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class StepCase:
    """One model's compiled train step on the devices, its state and a fixed random batch."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list[jax.Device], seed: int = 0):
        self.config = config
        self.trainer = Trainer(config, workdir="", devices=devices)   # the digits set it opens is not read
        self.state = self.trainer.fresh_state()
        m, b = self.trainer.model, config.train.batch_size
        rng = np.random.default_rng(seed)
        host = {"image": rng.standard_normal((b, m.image_size, m.image_size, m.in_channels), np.float32),
                "label": rng.integers(0, m.num_classes, b).astype(np.int32)}
        self.batch = {k: sharding.put_global(v, self.trainer.batch_sharding) for k, v in host.items()}
        lowered = self.trainer.step.lower(self.state, self.batch, self.trainer.teacher_params)
        start = time.perf_counter()
        self.step = lowered.compile()
        self.compile_s = time.perf_counter() - start
        # The compiled program is each device's (the step's gradient is a shard_map over the mesh): × devices.
        self.xla_step_flops = float(self.step.cost_analysis()["flops"]) * len(devices)
        memory = self.step.memory_analysis()
        self.memory_gib = None if memory is None else {
            k: round(getattr(memory, f"{k}_size_in_bytes") / 2 ** 30, 3)
            for k in ("argument", "output", "alias", "temp", "generated_code")}
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.state["params"])
        self.model_flops = 3 * forward_flops(m, shapes, b)

    def seconds_per_step(self, steps: int) -> float:
        """Mean seconds of ``steps`` steps dispatched back to back (timed to the last one's end)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch, self.trainer.teacher_params)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def train_figures(case: StepCase, seconds: float, peak: float | None, num_devices: int) -> dict[str, Any]:
    b = case.config.train.batch_size
    return {"step_s": seconds, "images_per_s": b / seconds, "images_per_s_per_device": b / seconds / num_devices,
            "model_tflop_per_step": case.model_flops / 1e12, "xla_step_tflop": case.xla_step_flops / 1e12,
            "mfu": case.model_flops / (seconds * num_devices * peak) if peak else None,
            "compile_s": case.compile_s, "memory_gib_per_device": case.memory_gib}


def bench_train(options: Options, devices: list[jax.Device], peak: float | None,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The DiT train step at each per-device batch of ``options.batches``."""
    results = []
    for per_device in options.batches:
        config = model_config(options, options.arch, per_device, len(devices), options.num_classes)
        entry: dict[str, Any] = {"model": model_name(config), "per_device_batch": per_device,
                                 "global_batch": config.train.batch_size, "steps": options.steps}
        log(f"train step {entry['model']}, {per_device} per device x {len(devices)} devices")
        try:
            case = StepCase(config, devices)
            case.seconds_per_step(options.warmup)
            entry.update(train_figures(case, case.seconds_per_step(options.steps), peak, len(devices)))
            del case
        except jax.errors.JaxRuntimeError as e:   # running out of memory is a result; anything else a bug
            if not out_of_memory(e):
                raise
            entry["error"] = "out of memory: " + str(e).splitlines()[0][:300]
        log(f"  {entry}")
        results.append(entry)
    return results


def bench_kind(options: Options, devices: list[jax.Device], log: Callable[[str], None]) -> dict[str, Any]:
    """KIND (gated) over dense at the same size, classes and batch, measured alternately."""
    dense = model_config(options, options.kind_arch, options.kind_batch, len(devices), options.kind_num_classes)
    linear = kind_config(options.kind_learngene, options.kind_tailor, "gated")
    kind = model_config(options, options.kind_arch, options.kind_batch, len(devices), options.kind_num_classes, linear)
    log(f"KIND over dense: {model_name(kind)} and {model_name(dense)}, {options.kind_batch} per device")
    cases = {"dense": StepCase(dense, devices), "kind": StepCase(kind, devices)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case.seconds_per_step(options.warmup)
    for _ in range(options.rounds):
        for name, case in cases.items():
            times[name].append(case.seconds_per_step(options.steps))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {"model": model_name(kind), "dense": model_name(dense), "per_device_batch": options.kind_batch,
            "kind": linear.to_dict(), "dense_step_s": median["dense"], "kind_step_s": median["kind"],
            "kind_over_dense": median["kind"] / median["dense"],
            "times_s": {name: [round(t, 5) for t in ts] for name, ts in times.items()}}


def bench_sampling(options: Options, devices: list[jax.Device], log: Callable[[str], None]) -> dict[str, Any]:
    """Images/s of ``sample_steps``-step DDPM sampling with classifier-free guidance, split over the devices."""
    config = model_config(options, options.arch, options.sample_batch, len(devices), options.num_classes)
    trainer = Trainer(config, workdir="", devices=devices)
    params = trainer.fresh_state()["ema_params"]
    model, s, mesh = trainer.model, config.sample, trainer.mesh
    b = options.sample_batch * len(devices)
    shape = (b, model.image_size, model.image_size, model.in_channels)
    log(f"sampling {model_name(config)}: {options.sample_steps} steps, cfg {s.cfg_scale}, {b} images")

    def draw(p: Any, key: jax.Array, y: jax.Array) -> jax.Array:
        return run_sampler(lambda x, t, yy: model.apply({"params": p}, x, t, yy), trainer.diffusion, key, shape, y,
                           method=s.sampler, num_steps=options.sample_steps, cfg_scale=s.cfg_scale,
                           null_class=model.num_classes, learn_sigma=model.learn_sigma, eta=s.ddim_eta,
                           clip_denoised=s.clip_denoised)

    rows = sharding.batch_sharding(mesh)
    fn = jax.jit(draw, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh), rows), out_shardings=rows)
    labels = sharding.put_global(np.arange(b, dtype=np.int32) % model.num_classes, rows)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, jax.random.key(0), labels))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(params, jax.random.key(1), labels))
    seconds = time.perf_counter() - start
    return {"model": model_name(config), "sampler": s.sampler, "steps": options.sample_steps,
            "cfg_scale": s.cfg_scale, "images": b, "seconds": seconds, "images_per_s": b / seconds,
            "first_call_s": first}


def bench_torch(options: Options, torch_step: TorchStep, log: Callable[[str], None]) -> dict[str, Any]:
    """The PyTorch (diffusers) DiT train step at ``batches[0]`` images on one device."""
    config = model_config(options, options.arch, options.batches[0], 1, options.num_classes)
    log(f"torch: diffusers {model_name(config)}, batch {options.batches[0]}")
    run, params = torch_step(config)
    for _ in range(options.warmup + 1):
        run()
    start = time.perf_counter()
    for _ in range(options.steps):
        run()
    seconds = (time.perf_counter() - start) / options.steps
    return {"model": model_name(config), "batch": options.batches[0], "params": params, "step_s": seconds,
            "images_per_s": options.batches[0] / seconds}


def run(options: Options, log: Callable[[str], None] = print, torch_step: TorchStep | None = None) -> dict[str, Any]:
    """Every part of the suite on all local devices; logs the figures as one JSON line last."""
    devices = jax.local_devices()
    device = devices[0]
    peak = peak_flops(device)
    log(f"kindjax accelerator bench: {len(devices)} x {device.platform} ({device.device_kind}), {options.dtype}, "
        f"peak {peak / 1e12 if peak else None} TFLOP/s per device")
    result: dict[str, Any] = {"suite": "accelerator", "device": f"{device.platform}:{device.device_kind}",
                              "num_devices": len(devices), "peak_tflops_per_device": peak / 1e12 if peak else None,
                              "dtype": options.dtype, "overrides": list(options.overrides), "jax": jax.__version__}
    result["train"] = bench_train(options, devices, peak, log)
    result["kind_over_dense"] = bench_kind(options, devices, log)
    result["sampling"] = bench_sampling(options, devices, log)
    if options.torch:
        if torch_step is None:
            raise ValueError("--accel_torch needs the torch step (run through python -m kindjax.tools.bench)")
        result["torch"] = bench_torch(options, torch_step, log)
        xl = result["train"][0]
        if "images_per_s" in xl:
            result["torch"]["kindjax_over_torch_images_per_s"] = (
                xl["images_per_s_per_device"] / result["torch"]["images_per_s"])
    log(json.dumps(result))
    return result
