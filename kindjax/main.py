"""Command line: ``python -m kindjax.main --config configs/default.py --workdir DIR``.

Override any config key with ``--config.train.num_steps=1000``.  Rerunning the
same command resumes from the last checkpoint in ``DIR``.  Started as one of
several processes (TPU pod, SLURM, or ``JAX_COORDINATOR_ADDRESS`` set), it calls
``jax.distributed.initialize()`` first.
"""
from __future__ import annotations

from absl import flags

from kindjax import cli


def main(argv: list[str]) -> None:
    """Runs the job of ``--config`` in ``--workdir``."""
    del argv
    from kindjax.distributed import initialize

    initialize()
    from kindjax.train.stages import run

    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_config("Config file (configs/*.py).")
    flags.DEFINE_string("workdir", None, "The run's folder (written): checkpoints, logs, samples and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
