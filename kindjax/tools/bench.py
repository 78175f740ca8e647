"""Train-step benchmark: kindjax's DiT against diffusers' PyTorch DiT, and KIND against dense.

    python -m kindjax.tools.bench [--arch S --patch 2 --image_size 32 --channels 4 --batch 8]
    python -m kindjax.tools.bench --suite loader [--loader_images 50000 ...]   (kindjax.tools.bench_loader)
    python -m kindjax.tools.bench --suite accelerator    (kindjax.tools.bench_accelerator: DiT-XL/2 bf16, MFU)

Every step is one full optimizer step, timed to completion (``block_until_ready``;
``torch.cuda.synchronize`` for torch on a GPU).  All steps are compiled (or, for
torch, run) ``--warmup`` times first, then measured ``--repeats`` times with the
variants interleaved (the order rotates every repetition, so slow drifts of a
shared machine's load hit every variant alike); the figure is the median.

- ``dense``: kindjax's jitted :func:`kindjax.train.trainer.train_step` on the dense
  DiT: hybrid loss (MSE + VB), forward and backward, global-norm clipping, AdamW,
  parameter EMA, metrics.
- ``torch``: ``diffusers.DiTTransformer2DModel`` of the same size in training mode:
  noising, forward and backward of ``MSE(output, [ε, 0])`` (MSE on ε, a squared
  penalty on the variance channels standing in for the VB term), global-norm
  clipping, AdamW (``foreach``), parameter EMA (``torch._foreach_lerp_``).
- ``kind`` / ``grouped`` / ``naive``: the ``dense`` step on the KIND DiT (``--kind_*`` sizes,
  random classes), with the gated, grouped (the learngene and a group's tailors as one product)
  or naive (per-sample full-rank) formulation of the class gate, on the same parameters.

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from kindjax import cli
from kindjax.tools import bench_accelerator
from kindjax.tools import bench_loader
from kindjax import params as param_rules
from kindjax.config import base_config, validate
from kindjax.diffusion import GaussianDiffusion
from kindjax.papers.kind import facts as kind_facts
from kindjax.papers.kind.layer import kind_config
from kindjax.archs import DIT_ARCHS, resolve_dims
from kindjax.tools.bench_accelerator import forward_flops, peak_flops
from kindjax.models.dit import DiT, build_model
from kindjax.train.optimizer import make_optimizer
from kindjax.train.trainer import init_state, train_step

Runner = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Options:
    """What to benchmark: one field per flag of :func:`define_flags`, same name and default."""

    arch: str = "S"
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    patch: int = 2
    image_size: int = 32
    channels: int = 4
    batch: int = 8
    num_classes: int = 1000
    dtype: str = "float32"
    repeats: int = 7
    warmup: int = 1
    pause: float = 0.2
    skip_torch: bool = False
    skip_kind: bool = False
    skip_naive: bool = False
    skip_grouped: bool = False
    kind_num_classes: int = kind_facts.PRETRAIN_CLASSES
    kind_tailor: int = 1
    kind_learngene: int = -1


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per :class:`Options` field in ``flag_values`` (called only when
    the module runs as a program, or by a test on its own ``FlagValues``)."""
    d, fv = Options(), dict(flag_values=flag_values)
    flags.DEFINE_enum("suite", "step", ["step", "loader", "accelerator"], "step: the options below; loader: "
                      "kindjax.tools.bench_loader (its --loader_* flags); accelerator: kindjax.tools.bench_accelerator "
                      "(its --accel_* flags).", **fv)
    flags.DEFINE_enum("arch", d.arch, ["", *DIT_ARCHS], "DiT size, or '' for --hidden_size/--depth/--num_heads.", **fv)
    flags.DEFINE_integer("hidden_size", d.hidden_size, "Hidden size (with --arch '').", **fv)
    flags.DEFINE_integer("depth", d.depth, "Blocks (with --arch '').", **fv)
    flags.DEFINE_integer("num_heads", d.num_heads, "Attention heads (with --arch '').", **fv)
    flags.DEFINE_integer("patch", d.patch, "Patch size.", **fv)
    flags.DEFINE_integer("image_size", d.image_size, "Input side (the latent side for latent DiTs).", **fv)
    flags.DEFINE_integer("channels", d.channels, "Input channels.", **fv)
    flags.DEFINE_integer("batch", d.batch, "Images per train step.", **fv)
    flags.DEFINE_integer("num_classes", d.num_classes, "Classes of the dense and torch models.", **fv)
    flags.DEFINE_enum("dtype", d.dtype, ["float32", "bfloat16"], "Compute dtype.", **fv)
    flags.DEFINE_integer("repeats", d.repeats, "Timed rounds.", **fv)
    flags.DEFINE_integer("warmup", d.warmup, "Untimed steps per variant (the first compiles).", **fv)
    flags.DEFINE_float("pause", d.pause, "Idle seconds before each timed step.", **fv)
    flags.DEFINE_bool("skip_torch", d.skip_torch, "Skip the diffusers (PyTorch) step.", **fv)
    flags.DEFINE_bool("skip_kind", d.skip_kind, "Skip the KIND steps.", **fv)
    flags.DEFINE_bool("skip_naive", d.skip_naive, "Skip the naive KIND step.", **fv)
    flags.DEFINE_bool("skip_grouped", d.skip_grouped, "Skip the grouped KIND step.", **fv)
    flags.DEFINE_integer("kind_num_classes", d.kind_num_classes, "KIND N_cls (classes of the KIND model).", **fv)
    flags.DEFINE_integer("kind_tailor", d.kind_tailor, "KIND N_T.", **fv)
    flags.DEFINE_integer("kind_learngene", d.kind_learngene, "KIND N_G; -1: fill the rank, hidden - N_cls·N_T.", **fv)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Options:
    """The :class:`Options` that the parsed flags of :func:`define_flags` give."""
    return Options(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Options)})


def bench_config(options: Options, linear: ml_collections.ConfigDict | None = None,
                 num_classes: int | None = None) -> ml_collections.ConfigDict:
    """The full config of one benchmarked model (dense unless ``linear`` is given)."""
    config = base_config()
    config.model.update(dict(arch=options.arch, hidden_size=options.hidden_size, depth=options.depth,
                             num_heads=options.num_heads, image_size=options.image_size,
                             in_channels=options.channels, patch_size=options.patch,
                             num_classes=num_classes or options.num_classes, dtype=options.dtype))
    if linear is not None:
        config.model.linear = linear
    config.train.batch_size = options.batch
    validate(config, num_devices=1)
    return config


def kind_linear_config(options: Options, formulation: str) -> ml_collections.ConfigDict:
    """``config.model.linear`` of the KIND model; ``N_G = hidden - N_cls·N_T`` unless given."""
    n_learngene = options.kind_learngene
    if n_learngene < 0:
        hidden = resolve_dims(bench_config(options).model).hidden_size
        n_learngene = hidden - options.kind_num_classes * options.kind_tailor
    return kind_config(n_learngene, options.kind_tailor, formulation)


def fresh_state(config: ml_collections.ConfigDict) -> Any:
    """The trainer's initial train state (parameters, EMA, AdamW state) for ``config``."""
    model = build_model(config)
    init = functools.partial(init_state, model=model, optimizer=make_optimizer(config))
    return jax.jit(init)(jax.random.key(config.train.seed))


def jax_runner(config: ml_collections.ConfigDict, state: Any, seed: int = 0) -> tuple[Runner, DiT]:
    """One jitted train step from ``state`` (donated) on a fixed random batch of random classes.

    Returns the runner (one step, blocks until done) and the model.
    """
    model = build_model(config)
    step = jax.jit(functools.partial(train_step, model=model, diffusion=GaussianDiffusion.from_config(config.diffusion),
                                     optimizer=make_optimizer(config), config=config,
                                     base_key=jax.random.key(config.train.seed)),
                   donate_argnums=0)
    rng = np.random.default_rng(seed)
    b, s, c = config.train.batch_size, model.image_size, model.in_channels
    batch = {"image": jnp.asarray(rng.standard_normal((b, s, s, c), np.float32)),
             "label": jnp.asarray(rng.integers(0, model.num_classes, b), jnp.int32)}
    holder = [state]

    def run() -> None:
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready((holder[0], metrics))

    return run, model


def shapes_of(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def torch_runner(config: ml_collections.ConfigDict, device: str, seed: int = 0) -> tuple[Runner, int]:
    """The same-size ``diffusers.DiTTransformer2DModel`` train step (see the module docstring).

    Returns the runner and the torch model's parameter count.
    """
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    m, o = config.model, config.optim
    dims = resolve_dims(m)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=dims.num_heads, attention_head_dim=dims.hidden_size // dims.num_heads,
        in_channels=m.in_channels, out_channels=2 * m.in_channels, num_layers=dims.depth,
        sample_size=m.image_size, patch_size=m.patch_size, num_embeds_ada_norm=m.num_classes,
        norm_type="ada_norm_zero").to(device).train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                  weight_decay=o.weight_decay, foreach=True)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    sqrt_acp = torch.tensor(diffusion.sqrt_alphas_cumprod, dtype=torch.float32, device=device)
    sqrt_1m_acp = torch.tensor(diffusion.sqrt_one_minus_alphas_cumprod, dtype=torch.float32, device=device)
    b, s, c = config.train.batch_size, m.image_size, m.in_channels
    x0 = torch.randn(b, c, s, s, device=device)
    labels = torch.randint(0, m.num_classes, (b,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                              enabled=m.dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (b,), device=device)
        noise = torch.randn_like(x0)
        xt = sqrt_acp[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_acp[t].view(-1, 1, 1, 1) * noise
        with autocast:   # training mode: the model drops labels to the null class itself
            out = model(xt, timestep=t, class_labels=labels).sample.float()
        loss = torch.nn.functional.mse_loss(out, torch.cat([noise, torch.zeros_like(noise)], dim=1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - config.train.ema_decay)
        sync()

    return run, sum(p.numel() for p in params)


def timed(fn: Runner, pause: float = 0.0) -> float:
    """Seconds one call of ``fn`` takes, after ``pause`` idle seconds (spinning worker threads
    of the previous call, e.g. OpenMP's, settle first)."""
    time.sleep(pause)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(runners: dict[str, Runner], repeats: int, warmup: int, pause: float = 0.2,
            log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per call of every runner: ``warmup`` calls each (the first compiles), then
    ``repeats`` rounds, each calling every runner once, in an order rotated by one per round."""
    for name, fn in runners.items():
        first = timed(fn)
        log(f"  {name}: first step (compile + run) {first:.2f} s")
        for _ in range(warmup - 1):
            fn()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            times[name].append(timed(runners[name], pause))
        log(f"  round {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def torch_device() -> str:
    """``cuda`` when JAX runs on a GPU and torch sees one, else ``cpu``."""
    import torch

    return "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"


def run(options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds the variants, measures them side by side and returns the figures; the last line
    logged is the figures as one JSON object."""
    device = jax.devices()[0]
    dense_config = bench_config(options)
    dims = resolve_dims(dense_config.model)
    log(f"kindjax bench: DiT {options.arch or f'{dims.hidden_size}x{dims.depth}x{dims.num_heads}'}/{options.patch} on "
        f"{options.image_size}x{options.image_size}x{options.channels}, batch {options.batch}, {options.dtype}, "
        f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores")
    runners: dict[str, Runner] = {}
    log("building the dense kindjax step")
    state = fresh_state(dense_config)
    shapes = shapes_of(state["params"])
    runners["dense"], model = jax_runner(dense_config, state)
    result: dict[str, Any] = {"device": f"{device.platform}:{device.device_kind}", "arch": options.arch or "custom",
                              "hidden": dims.hidden_size, "depth": dims.depth, "patch": options.patch,
                              "image_size": options.image_size, "batch": options.batch, "dtype": options.dtype,
                              "cpu_cores": os.cpu_count(), "dense_params": param_rules.count(shapes)}
    if not options.skip_kind:
        log("building the KIND kindjax steps (gated" + ("" if options.skip_grouped else ", grouped")
            + ("" if options.skip_naive else ", naive") + ")")
        config = bench_config(options, kind_linear_config(options, "gated"), options.kind_num_classes)
        state = fresh_state(config)
        result["kind"] = config.model.linear.to_dict()
        result["kind_params"] = param_rules.count(state["params"])
        runners["kind"], _ = jax_runner(config, state)   # ``state`` is donated at its first step
        for formulation in ("grouped", "naive"):   # the same parameters, another formulation
            if not getattr(options, f"skip_{formulation}"):
                other = bench_config(options, kind_linear_config(options, formulation), options.kind_num_classes)
                runners[formulation], _ = jax_runner(other, jax.tree.map(jnp.copy, state))
    if not options.skip_torch:
        where = torch_device()
        log(f"building diffusers DiTTransformer2DModel step (torch, {where})")
        runners["torch"], result["torch_params"] = torch_runner(dense_config, where)
        result["torch_device"] = where
    log(f"measuring {list(runners)}: {options.warmup} warm-up, {options.repeats} interleaved rounds")
    times = measure(runners, options.repeats, options.warmup, options.pause, log)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    flops = forward_flops(model, shapes, options.batch)   # traced only: no compile
    peak = peak_flops(device)
    result.update({
        "kindjax_step_s": median["dense"],
        "torch_step_s": median.get("torch"),
        "ratio": median["dense"] / median["torch"] if "torch" in median else None,
        "kind_step_s": median.get("kind"),
        "grouped_step_s": median.get("grouped"),
        "naive_step_s": median.get("naive"),
        "kind_over_dense": median["kind"] / median["dense"] if "kind" in median else None,
        "grouped_over_dense": median["grouped"] / median["dense"] if "grouped" in median else None,
        "naive_over_dense": median["naive"] / median["dense"] if "naive" in median else None,
        "images_per_s": options.batch / median["dense"],
        "forward_gflops": flops / 1e9,
        "achieved_tflops": 3 * flops / median["dense"] / 1e12,
        "mfu": 3 * flops / median["dense"] / peak if peak else None,
        "repeats": options.repeats,
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    })
    log(json.dumps(result))
    return result


def main(argv: list[str]) -> None:
    """Runs the benchmark the flags describe."""
    del argv
    log = functools.partial(print, flush=True)
    if flags.FLAGS.suite == "loader":
        bench_loader.run(bench_loader.options_from_flags(), log)
    elif flags.FLAGS.suite == "accelerator":
        bench_accelerator.run(bench_accelerator.options_from_flags(), log,
                              torch_step=lambda config: torch_runner(config, torch_device()))
    else:
        run(options_from_flags(), log)


if __name__ == "__main__":
    define_flags()
    bench_loader.define_flags()
    bench_accelerator.define_flags()
    cli.run(main)
