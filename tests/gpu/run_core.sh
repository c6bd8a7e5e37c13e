#!/usr/bin/env bash
# GPU verification of the runtime core: doctor, selftest with MPS on and off, the transport
# benchmark and the CUDA ring tests. Usage (repo root, on a GPU host):
#   OUT=/tmp/out bash tests/gpu/run_core.sh        -> $OUT/core.log
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"; LOG=$OUT/core.log
run() { echo "=== $*" | tee -a "$LOG"; "$@" 2>&1 | grep -v "^W11\|^\*\*\*\*" | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
run timeout 300 python -m colocate doctor --device cuda
run timeout 240 torchrun --standalone --nproc-per-node 2 -m colocate selftest --mps required --steps 200 --bytes $((256 << 20)) --slots 2
run timeout 240 torchrun --standalone --nproc-per-node 2 -m colocate selftest --mps off --steps 200 --bytes $((256 << 20)) --slots 2
run timeout 400 python -m colocate bench transport --iters 20
run timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu
