"""Command line of the ADM-style evaluation (:mod:`kindjax.evaluation.pipeline`):

    python -m kindjax.evaluation --config CONFIG --run RUN [--step S] [--out DIR] [--config.eval.num_samples=50000]

scores checkpoint ``--step`` (default: the latest) of the training run ``RUN`` and writes the results
(``eval_<step>.json``, the sample batch, the Inception features, TensorBoard scalars) into ``RUN``, or
into ``--out DIR`` (e.g. a run that is read-only, or another sampling setting kept apart).  The
reference batch it scores against (``eval.reference``) is written by ``python -m
kindjax.evaluation.reference``.

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
    """Evaluates the checkpoint ``--step`` (default: the latest) of ``--run`` into ``--out`` (default: the run)."""
    del argv
    f = flags.FLAGS
    initialize()
    if not jax.config.jax_compilation_cache_dir:
        # Each sampling chunk re-traces the same sampler; the persistent cache avoids recompiling it.
        jax.config.update("jax_compilation_cache_dir", os.path.join(f.out or f.run, "jax_cache"))
    evaluate(f.config, f.run, f.step, f.out)


if __name__ == "__main__":
    cli.define_config("Config file (configs/*.py).")
    flags.DEFINE_string("run", None, "Training workdir to evaluate (read: its checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_string("out", "", "Folder for the results (default: the run itself).")
    flags.mark_flags_as_required(["config", "run"])
    cli.run(main)
