#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, all local GPUs per process.
# jax.distributed.initialize() reads the SLURM environment (SLURM_NTASKS > 1).
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/dit_xl.py /shared/runs/xl
#SBATCH --job-name=kindjax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=TERM@120
# --signal: SLURM sends SIGTERM 2 minutes before the time limit; kindjax saves a
# checkpoint and exits, and resubmitting the same command resumes.
set -euo pipefail
CONFIG=${1:-configs/dit_xl.py}
WORKDIR=${2:?usage: gpu_slurm.sh CONFIG WORKDIR [overrides...]}
shift 2 || true
srun python -m kindjax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
