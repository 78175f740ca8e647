"""Compile time and XLA's memory analysis of the train step, per ``model.remat`` / ``model.scan_blocks``.

    python -m kindjax.tools.footprint --config configs/dit_xl.py --batches 32,64

prints one JSON line per setting: the seconds to lower and compile the step, and the per-device
bytes of ``jax.jit(step).lower(...).compile().memory_analysis()`` (arguments = the train state
and the batch, temporaries = activations and workspace, outputs aliased to the donated state).
Nothing runs: only shapes are used, so a CPU host measures a DiT-XL step too (the analysis is the
CPU compiler's; a GPU's differs in fusion details, not in what remat keeps).  The CPU compiler
overstates a TPU's needs (DiT-XL/2, 64 per chip, no remat: 89.5 GiB here, 27.5 GiB on v5p): for a
TPU slice (or an H100), ``python -m kindjax.tools.preflight`` compiles the trainer's own step with
that chip's compiler.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kindjax.diffusion import GaussianDiffusion
from kindjax.models.dit import build_model
from kindjax.train.optimizer import make_optimizer
from kindjax.train.trainer import init_state, train_step

#: The settings compared: (remat, scan_blocks).
SETTINGS = (("none", False), ("none", True), ("block", True), ("dots_saveable", True))


def footprint(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
    """Compile seconds and per-device bytes (``argument``, ``output``, ``alias``, ``temp`` and
    ``peak = argument + output − alias + temp``) of one train step at ``batch_size`` on one device."""
    model, optimizer = build_model(config), make_optimizer(config)
    state = jax.eval_shape(functools.partial(init_state, model=model, optimizer=optimizer), jax.random.key(0))
    m = config.model
    batch = {"image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, m.in_channels), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    step = functools.partial(train_step, model=model, diffusion=GaussianDiffusion.from_config(config.diffusion),
                             optimizer=optimizer, config=config, base_key=jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    sizes = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return {"compile_s": round(seconds, 2), **sizes}


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    config = flags.FLAGS.config
    for batch_size in [int(b) for b in flags.FLAGS.batches]:
        for remat, scan in SETTINGS:
            config.model.update(remat=remat, scan_blocks=scan)
            result = footprint(config, batch_size)
            print(json.dumps({"arch": config.model.arch, "dtype": config.model.dtype, "batch": batch_size,
                              "remat": remat, "scan_blocks": scan, "backend": jax.default_backend(), **result}),
                  flush=True)


if __name__ == "__main__":
    from absl import flags

    from kindjax import cli

    cli.define_config("Config file (configs/*.py).")
    flags.DEFINE_list("batches", ["32", "64"], "Per-device batch sizes, e.g. 32,64.")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
