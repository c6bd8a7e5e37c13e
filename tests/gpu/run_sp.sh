#!/usr/bin/env bash
# Issue 11's GPU table, for the 2 x H200 host (not yet run: that host was withheld when this
# was written). Qwen3-8B-shaped random-weight target, sglang engine, one sequence of L tokens
# per micro-step; sp_size 1 (two pairs, data-parallel) against 2 (one sequence-parallel
# group, the engines one TP=2 group). Prints max length reached, tokens/s per GPU and
# trainer peak memory per (L, sp_size). Repo root, 2-GPU host, .whl_sgl carried:
#   LENGTHS=32768,65536 OUT=/tmp/out bash tests/gpu/run_sp.sh
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-sp}; mkdir -p "$OUT"
LOGS=/tmp/colocate-sp-logs; rm -rf "$LOGS"; mkdir -p "$LOGS"  # back as one tarball at the end
[ -d "$SITE/sglang" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
bash examples/qwen3-8b-shape/prepare.sh >/dev/null
IFS=, read -ra LS <<< "${LENGTHS:-32768,65536}"
for L in "${LS[@]}"; do
  # 16 conversations of about L - 256 tokens: the 2000-token ones of prepare.sh joined.
  python - "$L" <<'PY'
import json, sys
L = int(sys.argv[1])
src = [json.loads(l) for l in open("runs/qwen3-8b-shape-data.jsonl")]
with open(f"runs/sp-data-{L}.jsonl", "w") as f:
    for i in range(16):
        parts, j = [], i
        while len(parts) * 2000 < L - 4000:  # ~2000 tokens per joined reply, a margin below L
            parts.append(src[j % len(src)]["messages"][1]["content"]); j += 3
        f.write(json.dumps({"messages": [src[i]["messages"][0],
                                         {"role": "assistant", "content": " ".join(parts)}]}) + "\n")
PY
  for SP in ${SPS:-1 2}; do
    name=sp-$L-$SP; rm -rf runs/$name
    timeout ${RUN_TIMEOUT:-500} torchrun --standalone --nproc-per-node 4 -m colocate train \
      --config examples/qwen3-8b-shape/run.yaml engine.backend=sglang engine.tp_size=$SP \
      train.sp_size=$SP data.path=runs/sp-data-$L.jsonl data.max_length=$L \
      data.tokens_per_micro_step=$L train.micro_steps=1 train.max_steps=${STEPS:-8} \
      train.log_every_s=0 run.dir=runs/$name ${SP_ARGS:-} > "$LOGS/$name.log" 2>&1
    echo "$name exit $?" | tee -a "$LOGS/exits.txt"
    cp runs/$name/metrics.jsonl "$LOGS/$name-metrics.jsonl" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
  done
done
python - "$LOGS" <<'PY' | tee "$OUT/sp_table.txt"
import glob, json, os, sys
out = sys.argv[1]
exits = dict(l.split(" exit ") for l in open(os.path.join(out, "exits.txt")).read().split("\n") if l)
print(f"{'length':>8} {'sp_size':>7} {'exit':>4} {'steps':>5} {'tok/s/GPU':>10} {'trainer GiB':>11}")
for name in sorted(exits, key=lambda n: (int(n.split('-')[1]), n)):
    _, L, sp = name.split("-")
    path = os.path.join(out, f"{name}-metrics.jsonl")
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    rate = rows[-1].get("tokens_per_s_per_gpu", 0) if rows else 0
    peak = max((r.get("trainer_peak_gib", 0) for r in rows), default=0)
    print(f"{L:>8} {sp:>7} {exits[name]:>4} {len(rows):>5} {rate:>10,.0f} {peak:>11.1f}")
PY
