#!/usr/bin/env bash
# One node: two ranks per visible GPU (even = trainer, odd = engine).
#   bash launch/train.sh --config run.yaml [key=value ...]
# Knobs (environment):
#   NPROC=N            ranks on this node (default: 2 x visible GPUs)
#   COLOCATE_DEBUG=1   tracebacks and debug logs (MPS, NUMA, hooks)
#   NCCL_DEBUG=INFO    NCCL communicator set-up (trainer and engine groups only)
# Debug modes: mps.mode=off (time-slice, rules MPS out), transport.num_slots=1 (serial),
# run.timeout_s=60 (fail fast on a stuck peer), engine.backend=hf (the reference engine).
set -euo pipefail
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -gt 0 ] || { echo "launch/train.sh: no GPU visible; on CPU use run.device=cpu with NPROC=4" >&2; }
nproc=${NPROC:-$((2 * (gpus > 0 ? gpus : 2)))}
# Pre-flight (about a second, no torch): config, paths and launch geometry, before any rank.
python -m colocate check --nproc "$nproc" --gpus "$gpus" "$@"
exec torchrun --standalone --nproc-per-node "$nproc" -m colocate train "$@"
