"""Command line: ``python -m kindjax.main --config configs/default.py --workdir DIR``.

Override any config key with ``--config.train.num_steps=1000``.  Rerunning the
same command resumes from the last checkpoint in ``DIR``.  Started as one of
several processes (TPU pod, SLURM, or ``JAX_COORDINATOR_ADDRESS`` set), it calls
``jax.distributed.initialize()`` first.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def started_multiprocess() -> bool:
    """True when a launcher started several JAX processes for one job."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def main(argv: list[str]) -> None:
    del argv
    import jax

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO

    if started_multiprocess():
        jax.distributed.initialize()
    from kindjax.config import ConfigError
    from kindjax.run import run

    try:
        run(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"kindjax: {e}")


if __name__ == "__main__":
    app.run(main)
