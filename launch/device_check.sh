#!/usr/bin/env bash
# The device check for a lent GPU: `python -m kindjax.tools.bench --suite accelerator` on one GPU, in
# under 8 minutes (the bench is stopped at 400 s; its log keeps every figure measured by then).
#   launch/device_check.sh OUTDIR [--accel_* flags of kindjax.tools.bench]
# Writes to OUTDIR: accelerator.json (the figures), bench.log, environment.txt (nvidia-smi, the
# jax/cuDNN packages, JAX's devices), attention.log (kindjax.models.attention.check_against_xla('cudnn'), where
# that function exists), summary.txt. Exit status: the bench's (1 if JAX is not on the GPU).
# KINDJAX_CHECK_PLATFORM=cpu runs it on the CPU (only to test this script; add --accel_size tiny).
set -uo pipefail
OUT=${1:?usage: launch/device_check.sh OUTDIR [bench flags...]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PLATFORM=${KINDJAX_CHECK_PLATFORM:-gpu}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one GPU
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export PYTHONUNBUFFERED=1
START=$SECONDS

{ nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|nvidia-cudnn[-a-z0-9]*|torch) '
} > "$OUT/environment.txt"
if ! "$PY" -c "
import sys, jax
from kindjax.distributed import warn_if_cpu_fallback
warn_if_cpu_fallback()
devices = jax.devices()
print('jax', jax.__version__, devices)
sys.exit(devices[0].platform != '$PLATFORM')" >> "$OUT/environment.txt" 2>&1; then
  echo "device_check.sh: JAX does not run on the $PLATFORM; see $OUT/environment.txt" | tee "$OUT/summary.txt" >&2
  exit 1
fi

# The cuDNN attention check, where kindjax.models.attention provides one.
if "$PY" -c "import sys; from kindjax.models import attention; sys.exit(not callable(getattr(attention, 'check_against_xla', None)))" 2>/dev/null; then
  timeout 45 "$PY" -c "import json; from kindjax.models import attention; print(json.dumps(attention.check_against_xla('cudnn')))" \
    > "$OUT/attention.log" 2>&1 || echo "device_check.sh: the attention check failed; see $OUT/attention.log" >&2
else
  echo "skipped: kindjax.models.attention has no check_against_xla()" > "$OUT/attention.log"
fi

timeout 400 "$PY" -m kindjax.tools.bench --suite accelerator "$@" > "$OUT/bench.log" 2>&1
rc=$?
if ! tail -n 1 "$OUT/bench.log" | "$PY" -c "
import json, sys
json.dump(json.loads(sys.stdin.read()), open(sys.argv[1], 'w'), indent=1)" "$OUT/accelerator.json" 2>/dev/null; then
  [ "$rc" -eq 0 ] && rc=1
  echo "device_check.sh: no figures (exit $rc); the measured part is in $OUT/bench.log" >&2
fi
echo "device_check: bench exit $rc after $((SECONDS - START)) s; figures in $OUT/accelerator.json" | tee "$OUT/summary.txt"
exit "$rc"
