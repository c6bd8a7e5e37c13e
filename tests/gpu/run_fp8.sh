#!/usr/bin/env bash
# engine.quantization=fp8 on one GPU: how far sglang's online FP8 moves the features
# (sglang_parity.py against the bf16 hf engine) and the engine's speed alone and in
# colocated K=3. Repo root, GPU host, .whl_sgl carried:
#   OUT=/tmp/out bash tests/gpu/run_fp8.sh
# MODES (default engine,k3) and BENCH_ARGS (default engine.quantization=fp8; a
# "--sweep engine.quantization=none,fp8" doubles the time: one mode of 14 steps takes ~2 min).
# Each step has its own timeout so a slow one leaves the others' outputs.
set -uo pipefail
SITE=${SITE:-/tmp/site}; OUT=${OUT:-/tmp/colocate-fp8}; mkdir -p "$OUT"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
[ -d "$SITE/sglang" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target "$SITE" .whl_sgl/*.whl
python examples/tiny/build.py --out examples/tiny >/dev/null  # the parity's real safetensors
timeout ${PARITY_S:-150} torchrun --standalone --nproc-per-node 2 tests/gpu/sglang_parity.py \
  --arch qwen3 --quantization fp8 --out "$OUT" > "$OUT/parity_fp8.txt" 2>&1
echo "parity rc=$?"; grep "rank 1\]" "$OUT/parity_fp8.txt" | tail -n 12
OUT=$OUT/bench MODES=${MODES:-engine,k3} STEPS=${STEPS:-14} WARMUP=${WARMUP:-4} \
  BENCH_ARGS=${BENCH_ARGS:-engine.quantization=fp8} WORK=/tmp/fp8-work \
  timeout ${BENCH_S:-420} bash tests/gpu/run_bench.sh
