#!/usr/bin/env bash
# draft.teacher_argmax=fp8 on one GPU: the teacher's agreement and time at the Qwen3-8B
# head's shape, colocated K=3 with the FP8 engine and the FP8 teacher, then the trainer's
# profile with each teacher. Repo root, GPU host, .whl_sgl carried:
#   OUT=/tmp/out bash tests/gpu/run_teacher_fp8.sh
# TEACHERS (default "exact fp8"; empty skips the profiles), BENCH_MODES (default k3; empty
# skips the bench). One profile compiles for ~75 s and takes ~120-150 s in all; K=3 at
# 14 steps ~250 s. Each step has its own timeout so a slow one leaves the others' outputs.
set -uo pipefail
SITE=${SITE:-/tmp/site}; OUT=${OUT:-/tmp/colocate-teacher}; mkdir -p "$OUT"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
timeout 120 python -m pytest -q -s tests/gpu/test_teacher_fp8.py 2>&1 | tail -n 15 \
  | tee "$OUT/test_teacher_fp8.txt"
[ -n "${BENCH_MODES-k3}" ] && OUT=$OUT/bench MODES=${BENCH_MODES-k3} STEPS=${STEPS:-14} \
  WARMUP=${WARMUP:-4} BENCH_ARGS=${BENCH_ARGS:-engine.quantization=fp8 draft.teacher_argmax=fp8} \
  WORK=/tmp/teacher-work timeout ${BENCH_S:-360} bash tests/gpu/run_bench.sh
for TEACHER in ${TEACHERS-exact fp8}; do
  timeout ${PROFILE_S:-170} python tests/gpu/profile_trainer.py --kernels compiled --tokens 16384 \
    --micro-steps 1 --seq-len 2048 --teacher-argmax "$TEACHER" --steps 5 --top 12 \
    2>&1 | grep -v "Warning\|warn(" > "$OUT/profile_$TEACHER.txt"
  echo "profile $TEACHER rc=$?"; grep -iE "teacher|tok/s|tokens/s|MFU" "$OUT/profile_$TEACHER.txt" | head -n 12
done
