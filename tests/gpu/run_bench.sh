#!/usr/bin/env bash
# The performance table of examples/bench/README.md: `colocate bench train` on one GPU with
# the Qwen3-8B-shaped random-weight target. Repo root, GPU host:
#   ENGINE=sglang MODES=k2,k3,k1 OUT=/tmp/out bash tests/gpu/run_bench.sh
# ENGINE: sglang (needs .whl_sgl or sglang on PYTHONPATH) or hf. MODES: see --modes.
# GPUS: GPU counts, e.g. 1,2 (rates per GPU, and a scaling line per mode).
# BASE_TREE: a directory under the repo root holding an older colocate/ package, made with
#   `mkdir .base_tree && git archive REF colocate | tar -x -C .base_tree` (git-ignore it and
#   carry it to the GPU host): the same modes run with it first, then with this tree, in one
#   call. Compare a change that way: colocated K=3 read 18.1k-18.8k tok/s in five device
#   calls of similar code (examples/bench/README.md), a spread as large as many changes.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-bench}; mkdir -p "$OUT"
if [ "${ENGINE:-sglang}" = sglang ] && [ ! -d "$SITE/sglang" ] && [ -d .whl_sgl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
fi
bash examples/qwen3-8b-shape/prepare.sh >/dev/null
python -m colocate prepare-vocab --config examples/qwen3-8b-shape/run.yaml >/dev/null 2>&1
# The work dirs stay off $OUT (a device call returns only a few files): their metrics and
# logs come back as tarballs, written even when the table is not (a timeout).
WORK=${WORK:-/tmp/colocate-bench-work}; rm -rf "$WORK" "$WORK.base"
pack() { [ -d "$1" ] && tar -czf "$2" -C "$1" --exclude=checkpoints --exclude=export \
  --exclude=.cache --exclude="*.jsonl.summary.json" --exclude=pregenerated.jsonl . 2>/dev/null; }
trap 'pack "$WORK" "$OUT/bench-work.tar.gz"; pack "$WORK.base" "$OUT/bench-work-base.tar.gz"' EXIT
for TREE in ${BASE_TREE:+"$BASE_TREE"} ""; do
  if [ -n "$TREE" ]; then echo "== base tree $TREE =="; elif [ -n "${BASE_TREE:-}" ]; then
    echo "== this tree =="; fi
  PYTHONPATH=$SITE:${TREE:+$PWD/$TREE:}$PWD python -m colocate bench train \
    --config examples/qwen3-8b-shape/run.yaml \
    engine.backend=${ENGINE:-sglang} ${BENCH_ARGS:-} --steps ${STEPS:-19} --warmup ${WARMUP:-6} \
    --modes ${MODES:-k2,k3,k1,ts,engine,trainer} --gpus ${GPUS:-1} --workdir "$WORK${TREE:+.base}" \
    2>&1 | tee "$OUT/bench_${ENGINE:-sglang}${TREE:+_base}.txt"
done
