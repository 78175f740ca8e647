"""Multi-process start-up shared by the command-line entry points (train, encode, evaluate)."""
from __future__ import annotations

import os


def started_multiprocess() -> bool:
    """True when a launcher started several JAX processes for one job (TPU pod, SLURM, MPI,
    or ``JAX_COORDINATOR_ADDRESS`` set)."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize() -> None:
    """``jax.distributed.initialize()`` when this process is one of several; nothing otherwise."""
    if started_multiprocess():
        import jax

        jax.distributed.initialize()
