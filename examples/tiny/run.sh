#!/usr/bin/env bash
# The tiny demo: build the local target/tokenizer (seconds, cached), then train an Eagle3
# draft with the target on the same devices and export it to RUN_DIR/export.
#   bash examples/tiny/run.sh [key=value ...]     e.g. train.max_steps=10 run.dir=runs/t2
# CPU: 4 ranks (2 pairs) with run.device=cpu. GPUs: 2 ranks per visible GPU.
# Knobs: NPROC (ranks per node), COLOCATE_DEBUG=1 (tracebacks, debug logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
python examples/tiny/build.py --out examples/tiny >/dev/null
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$((2 * gpus))}; device=()
else
  nproc=${NPROC:-4}; device=(run.device=cpu)
fi
exec torchrun --standalone --nproc-per-node "$nproc" -m colocate train \
  --config examples/tiny/config.yaml "${device[@]}" "$@"
