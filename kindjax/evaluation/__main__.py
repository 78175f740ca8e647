"""Command line of the ADM-style evaluation (:mod:`kindjax.evaluation.pipeline`):

    python -m kindjax.evaluation --config CONFIG --workdir DIR [--step S] [--config.eval.num_samples=50000]
    python -m kindjax.evaluation --config CONFIG --reference_out REF.npz [--reference_images N]

The second form writes the real images of the config's image source and classes (e.g. one task of
a class grouping: ``--config.data.grouping=G --config.data.task=T --config.data.split=validation``)
as an ADM reference batch (:mod:`kindjax.evaluation.reference`).

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
from kindjax.evaluation.reference import write_reference_batch


def main(argv: list[str]) -> None:
    """Evaluates the checkpoint ``--step`` (default: the latest) of ``--workdir``, or with
    ``--reference_out`` writes the reference batch of the config's image source and classes."""
    del argv
    f = flags.FLAGS
    if f.reference_out:
        write_reference_batch(f.config, f.reference_out, f.reference_images, f.config.eval.seed)
        return
    if not f.workdir:
        raise ValueError("--workdir is required (the training run to evaluate), unless --reference_out is given")
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
    flags.DEFINE_string("reference_out", "", "Write the reference batch (ADM .npz: real images arr_0, labels "
                        "arr_1) of the config's image source and classes here, instead of evaluating.")
    flags.DEFINE_integer("reference_images", 0, "With --reference_out: at most this many images (0: all), "
                         "drawn with eval.seed.")
    flags.mark_flags_as_required(["config"])
    cli.run(main, "evaluate")
