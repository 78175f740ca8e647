"""Train-step benchmark: kindjax's DiT against diffusers' PyTorch DiT, and KIND against dense.

    python -m kindjax.bench [--arch S --patch 2 --image_size 32 --channels 4 --batch 8]

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
- ``kind`` / ``naive``: the ``dense`` step on the KIND DiT (``--kind_*`` sizes,
  random classes), with the gated (efficient) or naive (per-sample full-rank)
  formulation of the class gate.

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kindjax import params as P
from kindjax.config import base_config
from kindjax.diffusion import GaussianDiffusion
from kindjax.layers.kind import kind_config
from kindjax.archs import DIT_ARCHS
from kindjax.models.dit import DiT, build_model
from kindjax.train.optimizer import make_optimizer
from kindjax.train.trainer import init_state, train_step

#: Peak dense bf16 FLOP/s by a substring of ``jax.Device.device_kind`` (first match wins).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("v5p", 459e12), ("v4", 275e12))

Runner = Callable[[], None]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kindjax.bench", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--arch", default="S", help="DiT size S/B/L/XL, or '' for --hidden_size/--depth/--num_heads")
    add("--hidden_size", type=int, default=384)
    add("--depth", type=int, default=12)
    add("--num_heads", type=int, default=6)
    add("--patch", type=int, default=2)
    add("--image_size", type=int, default=32, help="input side (the latent side for latent DiTs)")
    add("--channels", type=int, default=4)
    add("--batch", type=int, default=8)
    add("--num_classes", type=int, default=1000, help="classes of the dense and torch models")
    add("--dtype", default="float32", choices=("float32", "bfloat16"))
    add("--repeats", type=int, default=7)
    add("--warmup", type=int, default=1, help="untimed steps per variant (the first compiles)")
    add("--pause", type=float, default=0.2, help="idle seconds before each timed step")
    add("--skip_torch", action="store_true")
    add("--skip_kind", action="store_true")
    add("--skip_naive", action="store_true")
    add("--kind_classes", type=int, default=150, help="N_cls")
    add("--kind_tailor", type=int, default=1, help="N_T")
    add("--kind_learngene", type=int, default=-1, help="N_G; -1: fill the rank, hidden - N_cls·N_T")
    return parser.parse_args(argv)


def dims(args: argparse.Namespace) -> tuple[int, int, int]:
    """``(hidden size, depth, heads)`` of the benchmarked DiT."""
    return DIT_ARCHS[args.arch] if args.arch else (args.hidden_size, args.depth, args.num_heads)


def bench_config(args: argparse.Namespace, linear: ml_collections.ConfigDict | None = None,
                 num_classes: int | None = None) -> ml_collections.ConfigDict:
    """The full config of one benchmarked model (dense unless ``linear`` is given)."""
    config = base_config()
    hidden, depth, heads = dims(args)
    config.model.update(dict(arch="", hidden_size=hidden, depth=depth, num_heads=heads,
                             image_size=args.image_size, in_channels=args.channels,
                             patch_size=args.patch, num_classes=num_classes or args.num_classes,
                             dtype=args.dtype))
    if linear is not None:
        config.model.linear = linear
    config.train.batch_size = args.batch
    return config


def kind_linear_config(args: argparse.Namespace, formulation: str) -> ml_collections.ConfigDict:
    """``config.model.linear`` of the KIND model; ``N_G = hidden - N_cls·N_T`` unless given."""
    n_learngene = args.kind_learngene
    if n_learngene < 0:
        n_learngene = dims(args)[0] - args.kind_classes * args.kind_tailor
    return kind_config(n_learngene, args.kind_tailor, args.kind_classes, formulation)


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


def forward_flops(model: DiT, param_shapes: Any, batch: int) -> float:
    """FLOPs (2 per multiply-add) of one forward pass on ``batch`` images, from XLA's cost analysis.

    Counts the HLO of the traced forward: every matmul and attention product, plus
    the (small) elementwise work of norms, activations and softmax.
    """
    x = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, model.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    lowered = jax.jit(model.apply).lower({"params": param_shapes}, x, labels, labels)
    return float(lowered.cost_analysis()["flops"])


def peak_flops(device: jax.Device) -> float | None:
    """The chip's peak dense bf16 FLOP/s, or None for CPUs and unknown chips."""
    if device.platform == "cpu":
        return None
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device.device_kind), None)


def torch_runner(config: ml_collections.ConfigDict, device: str, seed: int = 0) -> tuple[Runner, int]:
    """The same-size ``diffusers.DiTTransformer2DModel`` train step (see the module docstring).

    Returns the runner and the torch model's parameter count.
    """
    import diffusers
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    m, o = config.model, config.optim
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=m.num_heads, attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=m.in_channels, out_channels=2 * m.in_channels, num_layers=m.depth,
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


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds the variants, measures them side by side and returns the figures."""
    device = jax.devices()[0]
    hidden, depth, heads = dims(args)
    log(f"kindjax bench: DiT {args.arch or f'{hidden}x{depth}x{heads}'}/{args.patch} on "
        f"{args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}, {args.dtype}, "
        f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores")
    runners: dict[str, Runner] = {}
    dense_config = bench_config(args)
    log("building the dense kindjax step")
    state = fresh_state(dense_config)
    shapes = shapes_of(state["params"])
    runners["dense"], model = jax_runner(dense_config, state)
    result: dict[str, Any] = {"device": f"{device.platform}:{device.device_kind}", "arch": args.arch or "custom",
                              "hidden": hidden, "depth": depth, "patch": args.patch,
                              "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
                              "cpu_cores": os.cpu_count(), "dense_params": P.count(shapes)}
    if not args.skip_kind:
        log("building the KIND kindjax steps (gated" + ("" if args.skip_naive else ", naive") + ")")
        config = bench_config(args, kind_linear_config(args, "gated"), args.kind_classes)
        state = fresh_state(config)
        result["kind"] = config.model.linear.to_dict()
        result["kind_params"] = P.count(state["params"])
        runners["kind"], _ = jax_runner(config, state)   # ``state`` is donated at its first step
        if not args.skip_naive:   # the same parameters, the other formulation
            naive = bench_config(args, kind_linear_config(args, "naive"), args.kind_classes)
            runners["naive"], _ = jax_runner(naive, jax.tree.map(jnp.copy, state))
    if not args.skip_torch:
        where = torch_device()
        log(f"building diffusers DiTTransformer2DModel step (torch, {where})")
        runners["torch"], result["torch_params"] = torch_runner(dense_config, where)
        result["torch_device"] = where
    log(f"measuring {list(runners)}: {args.warmup} warm-up, {args.repeats} interleaved rounds")
    times = measure(runners, args.repeats, args.warmup, args.pause, log)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    flops = forward_flops(model, shapes, args.batch)   # traced only: no compile
    peak = peak_flops(device)
    result.update({
        "kindjax_step_s": median["dense"],
        "torch_step_s": median.get("torch"),
        "ratio": median["dense"] / median["torch"] if "torch" in median else None,
        "kind_step_s": median.get("kind"),
        "naive_step_s": median.get("naive"),
        "kind_over_dense": median["kind"] / median["dense"] if "kind" in median else None,
        "naive_over_dense": median["naive"] / median["dense"] if "naive" in median else None,
        "images_per_s": args.batch / median["dense"],
        "forward_gflops": flops / 1e9,
        "achieved_tflops": 3 * flops / median["dense"] / 1e12,
        "mfu": 3 * flops / median["dense"] / peak if peak else None,
        "repeats": args.repeats,
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    })
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    result = run(args, log)
    log(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
