#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): puts this checkout on every worker, installs
# kindjax with jax[tpu] in a venv there, and runs the same command on all workers, detached from the
# ssh session (setsid nohup: a dropped connection stops nothing); each worker is one JAX process and
# jax.distributed.initialize() finds the others (kindjax.distributed: from the VM's metadata on GCE,
# from TPU_WORKER_HOSTNAMES on GKE).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/run1 launch/tpu_pod.sh [--config.key=value ...]
# Before anything goes to the workers, the pre-flight (python -m kindjax.tools.preflight) compiles the job's
# train step for the slice's accelerator type on this host (libtpu's compile-only devices: pip install -e
# '.[tpu]' here too) and stops the launch if it does not compile or does not fit in HBM.
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh status      # each worker: running, finished, stopped, failed or lost
#   TPU_NAME=... ZONE=... WORKDIR=... launch/tpu_pod.sh watch [--config.key=value ...]   # watch again
# The launcher then watches the workers (every KINDJAX_POLL_S seconds, 60) until the run ends. A run
# stopped by a preemption notice or a GCE maintenance event (kindjax saves the same step on every
# worker and exits), or lost with its VM (a restart), is started again with the same command, up to
# KINDJAX_RETRIES times (3); it resumes from its checkpoint. Each worker logs to ~/kindjax-run/worker.log.
# Closing the launcher's terminal stops nothing: `status` shows where the run is, `watch` goes on watching.
# Optional: CONFIG (configs/dit_xl.py), KINDJAX_MODULE (kindjax.main; kindjax.sweep for a sweep, with
# KINDJAX_SHARD=i/n for its shard i of n on this slice), KINDJAX_SHIP (untracked files or directories of
# the checkout to ship too, space-separated), PROJECT, REMOTE_DIR (kindjax, under the worker's home),
# KINDJAX_PYTHON (3.11: uv provides it where the image's python3 is older), LIBTPU_INIT_ARGS (added to ours).
# KINDJAX_LOCAL_PYTHON (python3: this host's, for the pre-flight), KINDJAX_PREFLIGHT=0 (skip the pre-flight).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACTION=run
case "${1:-}" in status|watch) ACTION=$1; shift ;; esac
if [ "$ACTION" != status ]; then : "${WORKDIR:?set WORKDIR}"; fi
CONFIG=${CONFIG:-configs/dit_xl.py}
REMOTE_DIR=${REMOTE_DIR:-kindjax}
PYTHON_VERSION=${KINDJAX_PYTHON:-3.11}
POLL_S=${KINDJAX_POLL_S:-60}
RETRIES=${KINDJAX_RETRIES:-3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then WHERE+=(--project "$PROJECT"); fi
RUN_DIR='$HOME/kindjax-run'   # on each worker: run.sh, worker.log, pid, exit_code, stopped

# Each worker's state, one line: "kindjax-worker <host> <state> <detail>", then its log's last lines.
# finished/failed: the run exited 0/non-0; stopped: it saved on a stop request (preemption, maintenance,
# SIGTERM) and exited; running; lost: no process and no exit status (the VM restarted); none: never started.
STATUS="cd $RUN_DIR 2>/dev/null || { echo kindjax-worker \$(hostname) none -; exit 0; }
  if [ -f exit_code ]; then code=\$(cat exit_code)
    if [ -f stopped ]; then state=stopped; elif [ \"\$code\" = 0 ]; then state=finished; else state=failed; fi
  elif [ -f pid ] && kill -0 \$(cat pid) 2>/dev/null; then state=running; code=-
  else state=lost; code=-; fi
  echo kindjax-worker \$(hostname) \$state \$code; tail -n 3 worker.log 2>/dev/null | sed 's/^/    /'"

status() { "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$STATUS"; }

if [ "$ACTION" = status ]; then status; exit 0; fi

# KINDJAX_MODULE=kindjax.sweep runs a sweep (KINDJAX_SHARD=i/n: its shard i of n) instead of one training run.
SHARD_ARGS=()
if [ -n "${KINDJAX_SHARD:-}" ]; then SHARD_ARGS=(--shard "$KINDJAX_SHARD"); fi
# LIBTPU_INIT_ARGS: overlap the data-parallel all-reduce and the FSDP all-gathers with compute (flag
# names checked against libtpu 0.0.42.1, the one jax[tpu]==0.10.2 pins).
TPU_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true"
TPU_FLAGS+=" --xla_enable_async_all_gather=true ${LIBTPU_INIT_ARGS:-}"
RUN=$(printf '%q ' .venv/bin/python -m "${KINDJAX_MODULE:-kindjax.main}" --config "$CONFIG" --workdir "$WORKDIR" \
  ${SHARD_ARGS[@]+"${SHARD_ARGS[@]}"} "$@")
# The script each worker runs detached: the command, its exit status kept; KINDJAX_STOP_FILE is where
# kindjax notes that it saved on a stop request (then the launcher starts it again).
SCRIPT="cd \"\$HOME/$REMOTE_DIR\"
LIBTPU_INIT_ARGS=$(printf '%q' "$TPU_FLAGS") PYTHONUNBUFFERED=1 KINDJAX_STOP_FILE=\"\$HOME/kindjax-run/stopped\" $RUN
echo \$? > \"\$HOME/kindjax-run/exit_code\""
START="set -e; mkdir -p $RUN_DIR && cd $RUN_DIR && rm -f exit_code stopped
  echo $(printf '%s' "$SCRIPT" | base64 | tr -d '\n') | base64 -d > run.sh
  echo \"=== \$(date -u +%FT%TZ) start\" >> worker.log
  setsid nohup bash run.sh >> worker.log 2>&1 < /dev/null & echo \$! > pid"

if [ "$ACTION" = run ]; then
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

  # 1. The code: the checkout's tracked files as they are now (uncommitted edits included), and the
  # untracked ones KINDJAX_SHIP names, to every worker.
  TARBALL=$(mktemp -d)/kindjax.tar.gz
  read -r -a SHIP <<< "${KINDJAX_SHIP:-}"
  for path in ${SHIP[@]+"${SHIP[@]}"}; do
    [ -e "$REPO/$path" ] || { echo "tpu_pod.sh: KINDJAX_SHIP names $path, which is not in $REPO" >&2; exit 1; }
  done
  { git -C "$REPO" ls-files -z; for path in ${SHIP[@]+"${SHIP[@]}"}; do printf '%s\0' "$path"; done; } \
    | tar -C "$REPO" --null -T - -czf "$TARBALL"
  "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:kindjax.tar.gz" "${WHERE[@]}"

  # 2. Unpack and install on every worker: a venv with kindjax and jax[tpu] (libtpu), pinned by pyproject.toml.
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/kindjax.tar.gz -C ~/$REMOTE_DIR
    python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
    cd ~/$REMOTE_DIR && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION .venv
    ~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]'"

  # 3. Start the run on all workers at once, detached.
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$START"
  echo "tpu_pod.sh: started on every worker of $TPU_NAME (logs: ~/kindjax-run/worker.log there; \`launch/tpu_pod.sh status\` shows each worker)."
fi

# 4. Watch: until every worker has ended; start again what a preemption or maintenance stopped.
attempt=0
while true; do
  sleep "$POLL_S"
  if ! states=$(status 2>&1); then
    echo "tpu_pod.sh: $TPU_NAME does not answer (a restart?); asking again in ${POLL_S}s." >&2
    continue
  fi
  lines=$(grep '^kindjax-worker ' <<< "$states" || true)
  if grep -q ' running ' <<< "$lines"; then continue; fi
  if ! grep -qv ' finished ' <<< "$lines"; then
    echo "tpu_pod.sh: the run finished on every worker."
    exit 0
  fi
  if grep -q ' failed ' <<< "$lines" && ! grep -q ' lost ' <<< "$lines"; then
    echo "tpu_pod.sh: the run failed:" >&2
    echo "$states" >&2
    exit 1
  fi
  # stopped (a preemption notice, a maintenance event, SIGTERM), lost (a VM restarted; the others then
  # fail without their peer) or never started
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$RETRIES" ]; then
    echo "tpu_pod.sh: stopped or lost $attempt times; not starting again (KINDJAX_RETRIES=$RETRIES):" >&2
    echo "$states" >&2
    exit 1
  fi
  echo "tpu_pod.sh: the run was stopped or lost ($(awk '{print $3}' <<< "$lines" | sort | uniq -c | xargs)); starting it again ($attempt of $RETRIES), it resumes from its checkpoint."
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$START"
done
