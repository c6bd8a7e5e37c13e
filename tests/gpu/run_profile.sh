#!/usr/bin/env bash
# Where the trainer's time goes (tests/gpu/profile_trainer.py), then the trainer-alone and
# colocated K=3 rows of `bench train` with the sglang engine. Repo root, GPU host:
#   OUT=/tmp/out bash tests/gpu/run_profile.sh
# PROFILE_ARGS / BENCH_MODES / BENCH_ARGS override the defaults below; BENCH_MODES= skips it.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-profile}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
timeout ${PROFILE_TIMEOUT:-300} python tests/gpu/profile_trainer.py ${PROFILE_ARGS:---kernels eager,compiled} \
  --trace-dir "$OUT" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/profile_trainer.txt"
if [ -n "${BENCH_MODES-trainer,k3}" ]; then
  ENGINE=${ENGINE:-sglang} MODES=${BENCH_MODES-trainer,k3} STEPS=${STEPS:-19} WARMUP=${WARMUP:-6} \
    bash tests/gpu/run_bench.sh
fi
