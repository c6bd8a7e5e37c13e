#!/usr/bin/env bash
# Served acceptance of drafts trained on bf16 vs FP8 engine features (engine.quantization),
# same generated answers (generated once, kept in runs/), same steps, both with the sglang
# training engine (the tiny config trains with hf); served with the bf16 target by sglang's EAGLE3.
# Repo root, one GPU, .whl_sgl carried:  OUT=/tmp/out bash tests/gpu/run_fp8_quality.sh
set -uo pipefail
OUT=${OUT:-/tmp/colocate-fp8-quality}
COMMON="train.max_steps=${STEPS:-160} data.tokens_per_micro_step=4096 train.val_every_steps=80 checkpoint.every_steps=0 engine.backend=sglang"
for q in ${QUANTS:-none fp8}; do
  OUT=$OUT/$q STAGES=after PROMPTS=${PROMPTS:-4000} EVAL_ENGINE=${EVAL_ENGINE:-sglang} \
    KEEP_GEN=1 AFTER_TRAIN="$COMMON engine.quantization=$q" \
    bash tests/gpu/run_quality.sh > /dev/null 2>&1
  echo "== engine.quantization=$q"; grep -h "validation after\|^done:\|^sglang \|accept" "$OUT/$q/quality.log" | tail -n 8
done
