"""Command line: ``python -m kindjax.main --config configs/default.py --workdir DIR``.

Override any config key with ``--config.train.num_steps=1000``.  Rerunning the
same command resumes from the last checkpoint in ``DIR``.  Started as one of
several processes (TPU pod, SLURM, or ``JAX_COORDINATOR_ADDRESS`` set), it calls
``jax.distributed.initialize()`` first.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from kindjax.distributed import initialize

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO

    initialize()
    from kindjax.config import ConfigError
    from kindjax.run import run

    try:
        run(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"kindjax: {e}")


if __name__ == "__main__":
    app.run(main)
