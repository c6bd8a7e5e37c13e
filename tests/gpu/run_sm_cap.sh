#!/usr/bin/env bash
# Does the trainer compute the same step under an MPS SM cap? On the H200 (2026-12-01) a
# colocated run with mps.trainer_sm_percent=70 had a NaN gradient norm on every step and one
# with 50 a loss of exactly 0; 100 trained normally (docs/gpu-logs/online-h200/trainer-sm-cap/).
# This runs, as an MPS client at each cap, the trainer's kernels one by one against float64
# references (tests/gpu/sm_cap_kernels.py), then the trainer's own step
# (tests/gpu/profile_trainer.py, Qwen3-8B draft shapes, no engine), whose first-step loss and
# every gradient it checks against the uncapped run, per kernel mode and attention.
# Repo root, GPU host:  OUT=/tmp/out bash tests/gpu/run_sm_cap.sh
# PCTS (first = reference), ATTENTIONS, KERNELS, ARGS override the defaults below.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-sm-cap}; mkdir -p "$OUT"
ROOT=$(mktemp -d /tmp/smcap.XXXX)
export CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe CUDA_MPS_LOG_DIRECTORY=$ROOT/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "no MPS daemon"; exit 1; }
trap 'echo quit | nvidia-cuda-mps-control; cp -r "$CUDA_MPS_LOG_DIRECTORY" "$OUT/mps-log"' EXIT
PCTS=${PCTS:-100 70 50}
status=0
for pct in $PCTS; do  # the kernels one by one (seconds), against float64 references
  echo "=== kernels, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct timeout ${KERNEL_TIMEOUT:-180} python \
    tests/gpu/sm_cap_kernels.py 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/kernels-$pct.txt" \
    || status=1
done
for attention in ${ATTENTIONS:-flex loop}; do
  ref="$ROOT/ref-$attention.pt"
  for pct in $PCTS; do
    [ -f "$ref" ] && check="--reference $ref" || check="--save $ref"
    echo "=== attention $attention, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct timeout ${RUN_TIMEOUT:-240} python \
      tests/gpu/profile_trainer.py --kernels ${KERNELS:-eager,compiled} --attention "$attention" \
      --no-profile --warmup 1 --steps 1 ${ARGS:-} $check 2>&1 \
      | grep -v "Warning\|warn(" | tee "$OUT/sm-cap-$attention-$pct.txt" || status=1
  done
done
grep -h "agree\|DISAGREE\|WRONG\|SMs reported\|===" "$OUT"/kernels-*.txt "$OUT"/sm-cap-*.txt \
  > "$OUT/summary.txt"
exit $status
