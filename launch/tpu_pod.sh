#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): puts this checkout on every worker, installs
# kindjax with jax[tpu] in a venv there, and runs the same command on all workers; each worker is
# one JAX process and jax.distributed.initialize() finds the others (kindjax.distributed: from the
# VM's metadata on GCE, from TPU_WORKER_HOSTNAMES on GKE).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/run1 launch/tpu_pod.sh [--config.key=value ...]
# Before anything goes to the workers, the pre-flight (python -m kindjax.tools.preflight) compiles the job's
# train step for the slice's accelerator type on this host (libtpu's compile-only devices: pip install -e
# '.[tpu]' here too) and stops the launch if it does not compile or does not fit in HBM.
# Optional: CONFIG (configs/dit_xl.py), KINDJAX_MODULE (kindjax.main; kindjax.sweep for a sweep, with
# KINDJAX_SHARD=i/n for its shard i of n on this slice), PROJECT, REMOTE_DIR (kindjax, under the worker's home),
# KINDJAX_PYTHON (3.11: uv provides it where the image's python3 is older), LIBTPU_INIT_ARGS (added to ours),
# KINDJAX_LOCAL_PYTHON (python3: this host's, for the pre-flight), KINDJAX_PREFLIGHT=0 (skip the pre-flight).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/dit_xl.py}
REMOTE_DIR=${REMOTE_DIR:-kindjax}
PYTHON_VERSION=${KINDJAX_PYTHON:-3.11}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then WHERE+=(--project "$PROJECT"); fi

# LIBTPU_INIT_ARGS (the workers' and the pre-flight's): overlap the data-parallel all-reduce and the
# FSDP all-gathers with compute (flag names checked against libtpu 0.0.42.1, the one jax[tpu]==0.10.2 pins).
TPU_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true"
TPU_FLAGS+=" --xla_enable_async_all_gather=true ${LIBTPU_INIT_ARGS:-}"

# 0. The pre-flight on this host, for the slice's accelerator type (gcloud describes it), with the job's
# config and overrides (a sweep: its config's first run) and the workers' XLA flags.
if [ "${KINDJAX_PREFLIGHT:-1}" != 0 ]; then
  DESCRIBE=(--zone "$ZONE" --format='value(acceleratorType)')
  if [ -n "${PROJECT:-}" ]; then DESCRIBE+=(--project "$PROJECT"); fi
  TYPE=$("${GCLOUD[@]}" describe "$TPU_NAME" "${DESCRIBE[@]}")
  OVERRIDES=()
  if [ "${KINDJAX_MODULE:-kindjax.main}" = kindjax.main ]; then OVERRIDES=("$@"); fi
  if ! (cd "$REPO" && LIBTPU_INIT_ARGS="$TPU_FLAGS" "${KINDJAX_LOCAL_PYTHON:-python3}" -m kindjax.tools.preflight \
        --config "$CONFIG" --topology "$TYPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"}); then
    echo "tpu_pod.sh: the pre-flight above says the job does not compile or does not fit on $TPU_NAME ($TYPE);" \
         "nothing was started. Change the config as it advises (KINDJAX_PREFLIGHT=0 skips the check)." >&2
    exit 1
  fi
fi

# 1. The code: the checkout's tracked files as they are now (uncommitted edits included) to every worker.
TARBALL=$(mktemp -d)/kindjax.tar.gz
git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$TARBALL"
"${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:kindjax.tar.gz" "${WHERE[@]}"

# 2. Unpack and install on every worker: a venv with kindjax and jax[tpu] (libtpu), pinned by pyproject.toml.
"${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "set -e
  rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/kindjax.tar.gz -C ~/$REMOTE_DIR
  python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
  cd ~/$REMOTE_DIR && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION .venv
  ~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]'"

# 3. Run on all workers at once.
# KINDJAX_MODULE=kindjax.sweep runs a sweep (KINDJAX_SHARD=i/n: its shard i of n) instead of one training run.
SHARD_ARGS=()
if [ -n "${KINDJAX_SHARD:-}" ]; then SHARD_ARGS=(--shard "$KINDJAX_SHARD"); fi
RUN=$(printf '%q ' .venv/bin/python -m "${KINDJAX_MODULE:-kindjax.main}" --config "$CONFIG" --workdir "$WORKDIR" \
  ${SHARD_ARGS[@]+"${SHARD_ARGS[@]}"} "$@")
"${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "cd ~/$REMOTE_DIR && \
  LIBTPU_INIT_ARGS=$(printf '%q' "$TPU_FLAGS") PYTHONUNBUFFERED=1 $RUN"
