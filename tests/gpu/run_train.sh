#!/usr/bin/env bash
# GPU verification of Eagle3 training: the tiny demo on one GPU (2 ranks, MPS) and a
# Qwen3-8B-shaped random-weight target for a few steps. Usage (repo root, GPU host):
#   OUT=/tmp/out bash tests/gpu/run_train.sh     -> $OUT/train.log, tiny/q8b metrics
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"; LOG=$OUT/train.log
run() { echo "=== $*" | tee -a "$LOG"; "$@" 2>&1 | grep -v "^W11\|^\*\*\*\*\|^Loading weights" | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }
run timeout 300 bash examples/tiny/run.sh run.dir=runs/gpu-tiny mps.mode=required
cp runs/gpu-tiny/metrics.jsonl "$OUT/tiny_metrics.jsonl" 2>/dev/null
bash examples/qwen3-8b-shape/prepare.sh | tee -a "$LOG"
run timeout 420 torchrun --standalone --nproc-per-node 2 -m colocate train --config examples/qwen3-8b-shape/run.yaml ${Q8B_ARGS:-}
cp runs/qwen3-8b-shape/metrics.jsonl "$OUT/q8b_metrics.jsonl" 2>/dev/null
nvidia-smi | tee -a "$LOG"
