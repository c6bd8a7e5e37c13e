#!/usr/bin/env bash
# Online decode (data.source=generate) with sglang, small and watched: a short run whose
# output goes straight to $OUT, and, if it is still running after WATCH_S, every Python
# process's stacks (py-spy, from .whl_dbg/) and nvidia-smi before it is stopped.
#   OUT=/tmp/out bash tests/gpu/run_online_smoke.sh     (repo root, one GPU)
# py-spy travels as a wheel (the GPU host has no network); fetch it once, here:
#   pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 py-spy -d .whl_dbg
# and carry .whl_dbg (listed in .git/info/exclude) with .whl_sgl.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 COLOCATE_DEBUG=${COLOCATE_DEBUG:-1}
OUT=${OUT:-/tmp/colocate-online}; mkdir -p "$OUT"
[ -d "$SITE/sglang" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
[ -d .whl_dbg ] && python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl_dbg/*.whl
python examples/tiny/build.py --out examples/tiny > "$OUT/build.log" 2>&1
rm -rf runs/o-smoke; mkdir -p runs
torchrun --standalone --nproc-per-node 2 -m colocate train --config examples/tiny/config.yaml \
  mps.mode=required run.dir=runs/o-smoke data.source=generate generate.engine=sglang \
  generate.chunk_records=${CHUNK:-64} train.max_steps=${STEPS:-20} data.holdout=8 \
  train.val_every_steps=0 checkpoint.every_steps=0 run.startup_timeout_s=${STARTUP_S:-240} \
  run.timeout_s=${TIMEOUT_S:-120} ${EXTRA:-} > "$OUT/train.log" 2>&1 &
pid=$!
for _ in $(seq "${WATCH_S:-200}"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
if kill -0 $pid 2>/dev/null; then
  echo "still running after ${WATCH_S:-200} s: stacks" >> "$OUT/train.log"
  for p in $(pgrep -f "python|colocate|sglang"); do
    echo "=== pid $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-200)"
    /tmp/pyspy/bin/py-spy dump --pid "$p" 2>&1 | head -80
  done > "$OUT/stacks.txt" 2>&1
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  pkill -TERM -P $pid; sleep 10; kill -9 $pid 2>/dev/null
fi
wait $pid; echo "exit $?" >> "$OUT/train.log"
cp runs/o-smoke/metrics.jsonl "$OUT/" 2>/dev/null
ls /tmp/*.log 2>/dev/null
tail -30 "$OUT/train.log"
