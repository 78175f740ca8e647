"""Command line of the ADM-style evaluation (:mod:`kindjax.evaluation.pipeline`):

    python -m kindjax.evaluate --config CONFIG --workdir DIR [--step S] [--config.eval.num_samples=50000]

Started by a launcher on several hosts (as ``launch/`` starts training), every process runs the same
command: sampling and feature extraction are split over all devices, process 0 writes the files.
"""
from __future__ import annotations

import os

import jax
from absl import flags

from kindjax import cli
from kindjax.distributed import initialize
from kindjax.evaluation.pipeline import evaluate


def main(argv: list[str]) -> None:
    """Evaluates the checkpoint ``--step`` (default: the latest) of ``--workdir``."""
    del argv
    initialize()
    if not jax.config.jax_compilation_cache_dir:
        # Each sampling chunk re-traces the same sampler; the persistent cache avoids recompiling it.
        jax.config.update("jax_compilation_cache_dir", os.path.join(flags.FLAGS.workdir, "jax_cache"))
    evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/; results are written there.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, "evaluate")
