#!/usr/bin/env bash
# Does the trainer compute the same step under an MPS SM cap? On the H200 (2026-12-01) a
# colocated run with mps.trainer_sm_percent=70 had a NaN gradient norm on every step and one
# with 50 a loss of exactly 0; 100 trained normally (docs/gpu-logs/online-h200/trainer-sm-cap/).
# This runs, as an MPS client at each cap, the trainer's kernels one by one against float64
# references (tests/gpu/sm_cap_kernels.py), then the trainer's own step
# (tests/gpu/profile_trainer.py, Qwen3-8B draft shapes, no engine), whose first-step loss and
# every gradient it checks against the uncapped run, per kernel mode and attention.
# First of all it runs the start-up GEMM check (colocate/gemm_check.py) shape by shape at
# each cap of PROBE_PCTS (tests/gpu/gemm_cap_probe.py, Qwen3-8B shapes; PROBE_ARGS passes
# e.g. --tokens 4096), and at 70 again with each VAR=VALUE of BLAS_ENVS set, to try
# workarounds: BLAS_ENVS="TORCH_BLAS_PREFER_CUBLASLT=1 DISABLE_ADDMM_CUDA_LT=1".
# Repo root, GPU host:  OUT=/tmp/out bash tests/gpu/run_sm_cap.sh
# PCTS (first = reference), ATTENTIONS, KERNELS, ARGS override the defaults below;
# SKIP_STEPS=1 skips the trainer's whole step (the slow part: minutes per cap).
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
for pct in ${PROBE_PCTS:-100 90 80 70 60 50}; do  # the model's GEMM shapes (seconds)
  echo "=== GEMM probe, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct timeout ${PROBE_TIMEOUT:-120} python \
    tests/gpu/gemm_cap_probe.py ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe-$pct.txt" || status=1
done
for blas_env in ${BLAS_ENVS:-}; do  # workarounds: the same probe at 70 with one variable set
  echo "=== GEMM probe, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70 $blas_env"
  env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70 "$blas_env" timeout ${PROBE_TIMEOUT:-120} python \
    tests/gpu/gemm_cap_probe.py ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe-70-${blas_env//=/-}.txt" \
    || status=1
done
for pct in $PCTS; do  # the kernels one by one (seconds), against float64 references
  echo "=== kernels, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct timeout ${KERNEL_TIMEOUT:-180} python \
    tests/gpu/sm_cap_kernels.py 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/kernels-$pct.txt" \
    || status=1
done
ATTENTIONS=${ATTENTIONS:-flex loop}
[ "${SKIP_STEPS:-0}" = 1 ] && ATTENTIONS=""  # no trainer steps
for attention in $ATTENTIONS; do
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
grep -h "agree\|DISAGREE\|WRONG\|SMs reported\|GEMMs in\|===" "$OUT"/probe-*.txt \
  "$OUT"/kernels-*.txt "$OUT"/sm-cap-*.txt > "$OUT/summary.txt" 2>/dev/null
exit $status
