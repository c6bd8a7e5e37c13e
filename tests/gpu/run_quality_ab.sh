#!/usr/bin/env bash
# Served acceptance of drafts trained with one setting changed: by default bf16 vs FP8 engine
# features (engine.quantization), or e.g.
#   VARIANTS="draft.teacher_argmax=exact draft.teacher_argmax=fp8"
# Same generated answers (generated once, kept in runs/), same steps, all on the sglang
# training engine (the tiny config trains with hf); served with the bf16 target by sglang's
# EAGLE3. Repo root, one GPU, .whl_sgl carried:  OUT=/tmp/out bash tests/gpu/run_quality_ab.sh
# One override per variant (VARIANTS splits on spaces). Each variant writes $OUT/<variant>/ (quality.log, eval-after.json); ~3 min per variant.
set -uo pipefail
OUT=${OUT:-/tmp/colocate-fp8-quality}
# The answers are generated afresh by the first variant (REUSE_GEN=1: keep runs/q-gen.jsonl
# from an earlier call, e.g. when a device call ran out before every variant had run).
[ "${REUSE_GEN:-0}" = 1 ] || rm -rf runs/q-gen.jsonl runs/q-gen.jsonl.*
COMMON="train.max_steps=${STEPS:-160} data.tokens_per_micro_step=4096 train.val_every_steps=80 checkpoint.every_steps=0 engine.backend=sglang"
for v in ${VARIANTS:-engine.quantization=none engine.quantization=fp8}; do
  dir=$OUT/${v//[.=]/_}
  OUT=$dir STAGES=after PROMPTS=${PROMPTS:-4000} EVAL_ENGINE=${EVAL_ENGINE:-sglang} \
    KEEP_GEN=1 AFTER_TRAIN="$COMMON $v" bash tests/gpu/run_quality.sh > /dev/null 2>&1
  echo "== $v"; grep -h "validation after\|^done:\|^sglang \|accept" "$dir/quality.log" | tail -n 8
done
