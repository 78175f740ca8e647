#!/usr/bin/env bash
# Train on a SLURM GPU cluster, every GPU of every node: one process per GPU (8 tasks per node,
# each seeing the node's 8 GPUs and taking GPU SLURM_LOCALID; kindjax.distributed sets
# local_device_ids so, and finds the other processes from SLURM).
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/dit_xl.py /shared/runs/xl [--config.key=value ...]
#   KINDJAX_MODULE=kindjax.sweep sbatch --array=0-3 launch/gpu_slurm.sh configs/kind_dit_b.py /shared/sweep_b
#     (a sweep in 4 shards, one array task each; see the README)
# Run from the repository (on a file system every node sees). The venv ($KINDJAX_VENV, default
# ./.venv) is created and `pip install -e '.[cuda]'` run on first use, under a lock ($KINDJAX_VENV.lock,
# flock): the tasks of an array sweep start together and would race to build it; the first builds,
# the others wait and find it ready. KINDJAX_EXTRA=cuda13 for CUDA 13 drivers. For a multi-node run,
# add --config.mesh.dcn_data=<nodes> to keep FSDP traffic inside a node. Site NCCL settings
# (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are passed through.
# CPUs: --exclusive gives the job whole nodes, and each task gets its share of the node's cores
# (srun --cpus-per-task = SLURM_CPUS_ON_NODE / tasks per node, or KINDJAX_CPUS_PER_TASK): the data
# loader's threads and XLA's host work need them, and since SLURM 22.05 srun does not inherit
# sbatch's --cpus-per-task. On a cluster that shares nodes, submit with --no-exclusive (or
# --exclusive=user) and set KINDJAX_CPUS_PER_TASK.
#SBATCH --job-name=kindjax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@120
# --signal: SLURM sends SIGTERM to every task 2 minutes before the time limit; kindjax saves a
# checkpoint and exits, and resubmitting the same command resumes.
set -euo pipefail
CONFIG=${1:?usage: sbatch [--nodes=N] launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: sbatch [--nodes=N] launch/gpu_slurm.sh CONFIG WORKDIR [overrides...]}
shift 2
REPO=${KINDJAX_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}   # sbatch runs a copy of this file: find the code by the submit dir
VENV=${KINDJAX_VENV:-$REPO/.venv}
EXTRA=${KINDJAX_EXTRA:-cuda}
cd "$REPO"

# The environment: kindjax importable and a CUDA jaxlib plugin, else set up once (here, on the
# first node; the venv is on the shared file system).
READY='import importlib.util as u, sys; sys.exit(0 if u.find_spec("kindjax") and (u.find_spec("jax_cuda12_plugin") or u.find_spec("jax_cuda13_plugin")) else 1)'
mkdir -p "$(dirname "$VENV")"
(
  flock 9   # one builder at a time (released when this subshell ends, also if it is killed)
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  if ! "$VENV/bin/python" -c "$READY"; then
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRA]"
    "$VENV/bin/python" -c "$READY" || { echo "gpu_slurm.sh: $VENV has no CUDA jaxlib after pip install -e '.[$EXTRA]'" >&2; exit 1; }
  fi
) 9> "$VENV.lock"

# XLA: overlap collectives with compute (latency-hiding scheduler, pipelined and combined
# collectives); JAX takes 90% of each GPU's memory (its default is 75%). Flags the user set come first.
XLA_GPU_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${XLA_GPU_FLAGS[*]}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# NCCL: a failing collective says why in the log (site settings such as NCCL_SOCKET_IFNAME pass through).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1

# KINDJAX_MODULE=kindjax.sweep runs a sweep instead of one training run; as an array job
# (sbatch --array=0-$((n-1))) each array task runs shard SLURM_ARRAY_TASK_ID of n.
MODULE=${KINDJAX_MODULE:-kindjax.main}
SHARD=()
if [ "$MODULE" = kindjax.sweep ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  SHARD=(--shard "$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))/${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT is not set}")
fi
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
CPUS_PER_TASK=${KINDJAX_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-$TASKS_PER_NODE} / TASKS_PER_NODE ))}
srun --kill-on-bad-exit=1 --cpus-per-task="$((CPUS_PER_TASK > 0 ? CPUS_PER_TASK : 1))" "$VENV/bin/python" -m "$MODULE" --config "$CONFIG" --workdir "$WORKDIR" ${SHARD[@]+"${SHARD[@]}"} "$@"
