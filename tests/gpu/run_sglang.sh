#!/usr/bin/env bash
# GPU verification of the sglang engine backend (one H100 is enough). Repo root:
#   OUT=/tmp/out bash tests/gpu/run_sglang.sh            -> $OUT/sglang.log, json, metrics
# STAGES (default "check parity generate tiny q8b"): pick a subset, e.g. STAGES=parity.
# Needs the offline wheel bundle in .whl_sgl/ (docs/sglang.md) or sglang already on PYTHONPATH.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-sglang}; mkdir -p "$OUT"; LOG=$OUT/sglang.log
STAGES=${STAGES:-check parity generate tiny q8b}
run() { echo "=== $*" | tee -a "$LOG"; "$@" 2>&1 | grep -v "^W11\|^\*\*\*\*" | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if [ ! -d "$SITE/sglang" ] && [ -d .whl_sgl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
fi
has check && run python -m colocate patches check
python examples/tiny/build.py --out examples/tiny >/dev/null
if has parity; then
  for arch in llama qwen3; do  # one process per arch: a process holds one sglang engine
    run timeout 420 torchrun --standalone --nproc-per-node 2 tests/gpu/sglang_parity.py --arch "$arch" --out "$OUT"
  done
fi
if has generate; then  # the tiny target's answers: sglang (all GPUs) against hf on 64 records
  run timeout 540 python -m colocate generate --config examples/tiny/config.yaml --force \
    --engine sglang --out "$OUT/gen_sglang.jsonl"
  run timeout 300 python -m colocate generate --config examples/tiny/config.yaml --force \
    --engine hf --limit 64 --out "$OUT/gen_hf.jsonl" target.dtype=bfloat16
  run python tests/gpu/generate_compare.py "$OUT/gen_sglang.jsonl" "$OUT/gen_hf.jsonl"
fi
if has tiny; then
  rm -rf runs/sgl-tiny
  run timeout 540 bash examples/tiny/run.sh run.dir=runs/sgl-tiny engine.backend=sglang mps.mode=required train.max_steps=30
  cp runs/sgl-tiny/metrics.jsonl "$OUT/sgl_tiny_metrics.jsonl" 2>/dev/null
fi
if has q8b; then
  bash examples/qwen3-8b-shape/prepare.sh | tee -a "$LOG"
  rm -rf runs/qwen3-8b-shape-sgl
  run timeout 540 torchrun --standalone --nproc-per-node 2 -m colocate train --config examples/qwen3-8b-shape/run.yaml engine.backend=sglang run.dir=runs/qwen3-8b-shape-sgl
  cp runs/qwen3-8b-shape-sgl/metrics.jsonl "$OUT/sgl_q8b_metrics.jsonl" 2>/dev/null
fi
nvidia-smi | tee -a "$LOG"
