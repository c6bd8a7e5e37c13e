#!/usr/bin/env bash
# GPU verification of many nodes, on one 2-GPU host: two torchrun agents act as two nodes
# (--nnodes 2, c10d rendezvous on localhost), one GPU each, each with its own MPS daemon
# and pipe directory (its own TMPDIR), NCCL between the two trainers (and between the two
# engines), the sglang engine. The tiny demo trains and exports. Usage (repo root):
#   OUT=/tmp/out bash tests/gpu/run_two_nodes.sh   -> $OUT/two_nodes.log, node{0,1}.log, metrics
# Needs the offline wheel bundle in .whl_sgl/ (docs/sglang.md) or sglang on PYTHONPATH.
# Knobs: GPU_IDS=uuid|index [uuid]: how each "node" is given its GPU. By UUID the node's MPS
# daemon also sees only that GPU (colocate/mps_daemon.py keeps a UUID CUDA_VISIBLE_DEVICES for the
# daemon); by index both daemons see both GPUs (try it if the UUID run fails in sglang).
# ENGINE=sglang|hf [sglang], STEPS [20].
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NCCL_NVLS_ENABLE=0
export NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT}
OUT=${OUT:-/tmp/colocate-two-nodes}; mkdir -p "$OUT"; LOG=$OUT/two_nodes.log
ENGINE=${ENGINE:-sglang}; STEPS=${STEPS:-20}; GPU_IDS=${GPU_IDS:-uuid}
say() { echo "$*" | tee -a "$LOG"; }

if [ ! -d "$SITE/sglang" ] && [ -d .whl_sgl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
fi
python examples/tiny/build.py --out examples/tiny >/dev/null
nvidia-smi --query-gpu=index,uuid,name,compute_mode --format=csv | tee -a "$LOG"
mapfile -t uuids < <(nvidia-smi --query-gpu=uuid --format=csv,noheader)
[ "${#uuids[@]}" -ge 2 ] || { say "need 2 GPUs, found ${#uuids[@]}"; exit 1; }

run_dir=runs/gpu-two-nodes; rm -rf "$run_dir"
port=$((29500 + RANDOM % 1000))
args=(--config examples/tiny/config.yaml target.path="$PWD/examples/tiny/target-llama"
      data.path="$PWD/examples/tiny/data/conversations.jsonl" run.dir="$run_dir"
      engine.backend="$ENGINE" mps.mode=required train.max_steps="$STEPS"
      checkpoint.every_steps=10 data.holdout=0 train.val_every_steps=0)
pids=(); tmps=()
for node in 0 1; do
  tmp=$(mktemp -d "/tmp/cn$node.XXXX"); tmps+=("$tmp")  # short: MPS sockets live under TMPDIR
  if [ "$GPU_IDS" = uuid ]; then gpu=${uuids[$node]}; else gpu=$node; fi
  say "=== node $node: CUDA_VISIBLE_DEVICES=$gpu TMPDIR=$tmp"
  CUDA_VISIBLE_DEVICES=$gpu TMPDIR=$tmp timeout 600 torchrun --nnodes 2 --nproc-per-node 2 \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" --rdzv-id two-nodes \
    -m colocate train "${args[@]}" >"$OUT/node$node.log" 2>&1 &
  pids+=($!)
done
codes=()
for node in 0 1; do wait "${pids[$node]}"; codes+=($?); done
say "=== exit node0=${codes[0]} node1=${codes[1]}"

ok=1
check() { if eval "$2"; then say "ok:   $1"; else say "FAIL: $1"; ok=0; fi; }
check "both agents exit 0" '[ "${codes[*]}" = "0 0" ]'
check "the run spans 2 nodes" 'grep -q "2 pair(s) on 2 node(s)" "$OUT"/node*.log'
check "one MPS daemon per node, two pipe dirs" \
  '[ "$(grep -ho "mps: daemon (pid [0-9]*) serves [^;]*" "$OUT"/node*.log | sort -u | wc -l)" = 2 ]'
check "NCCL communicators were built" 'grep -q "NCCL INFO" "$OUT"/node*.log'
check "$STEPS steps in metrics.jsonl" \
  '[ "$(wc -l <"$run_dir/metrics.jsonl" 2>/dev/null)" = "$STEPS" ]'
check "the draft was exported" '[ -f "$run_dir/export/model.safetensors" ]'
check "each node's daemon stopped (its private dir removed)" \
  '! ls -d "${tmps[0]}"/colocate-mps-* "${tmps[1]}"/colocate-mps-* >/dev/null 2>&1'
cp "$run_dir/metrics.jsonl" "$OUT/two_nodes_metrics.jsonl" 2>/dev/null
for node in 0 1; do
  say "--- node $node (colocate lines, errors)"
  grep -E "colocate|mps:|error|Error|node\(s\)" "$OUT/node$node.log" | grep -v "NCCL INFO" | tail -n 25 | tee -a "$LOG"
done
nvidia-smi | tee -a "$LOG"
[ "$ok" = 1 ] && say "TWO NODES OK" || { say "TWO NODES FAILED (logs in $OUT)"; exit 1; }
