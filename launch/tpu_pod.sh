#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every host; each host
# becomes one JAX process (jax.distributed.initialize() finds the others through
# the TPU metadata, signalled here by TPU_WORKER_HOSTNAMES).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/dit_xl.py WORKDIR=gs://bucket/run1 launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/dit_xl.py}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/kindjax && pip install -q -e . && \
  python -m kindjax.main --config $CONFIG --workdir $WORKDIR $*"
