#!/usr/bin/env bash
# Draft quality as served (docs/quality.md quotes its output). On one H200, repo root:
#   OUT=/tmp/out bash tests/gpu/run_quality.sh        -> $OUT/quality.log and JSON results
# Stages (STAGES, default "before after gate"):
#   before  train the tiny recipe on the bundled conversations' own answers, serve it
#   after   regenerate the answers with the target (colocate generate), train on them, serve
#   gate    one-sample overfit: a reply whose text round-trips through the tokenizer (tiny
#           Llama target) and one whose text does not (the random tiny Qwen3 target)
#   online  online decode (data.source=generate): the engines answer the same prompts as
#           `after` while training, with its settings; served like `after` (compare the two)
#   q8b     colocate generate tokens/s with sglang, Qwen3-8B-shaped target (dummy weights)
# Every served number is measured twice: sglang's EAGLE3 decoder and the plain-torch
# reference (eval --engine both). DRAFT: overrides for every training run, e.g. DFlash:
#   DRAFT="draft.method=dflash draft.num_layers=2 draft.block_size=8" (eval then serves it
#   with sglang's DFLASH: the export's config.json says which decoder).
# EVAL_ENGINE=sglang serves with sglang only (default both). ENGINE=hf runs the same steps on the CPU (reference only),
# a dry run of this script. Needs the offline wheel bundle in .whl_sgl/ (docs/sglang.md).
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-quality}; mkdir -p "$OUT"; LOG=$OUT/quality.log
STAGES=${STAGES:-before after gate}
ENGINE=${ENGINE:-sglang}
# The random Qwen3 target's answers are near-ties in its softmax, which soft-label training
# fits slowly: on CPU its gate sample reached 2.40 after 120 steps at lr 3e-3, 3.43 after
# 300 at 5e-3 and 4.80 after 800 at 5e-3 (the reference decoder, 48 tokens).
GATE_STEPS=${GATE_STEPS:-800}; GATE_LR=${GATE_LR:-5e-3}
run() { echo "=== $*" | tee -a "$LOG"; "$@" 2>&1 | grep --line-buffered -v "^W11\|^\*\*\*\*\|^Loading weights" | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if [ "$ENGINE" = sglang ]; then
  [ -d "$SITE/sglang" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
  EVAL_ENGINE=${EVAL_ENGINE:-both}; NPROC=2; TRAIN_DEV=(mps.mode=required); GEN_DEV=()
else
  EVAL_ENGINE=hf; NPROC=4; TRAIN_DEV=(run.device=cpu); GEN_DEV=(run.device=cpu)
  export OMP_NUM_THREADS=1
fi
python examples/tiny/build.py --out examples/tiny 2>&1 | tee -a "$LOG"
CFG=examples/tiny/config.yaml
mkdir -p runs
# 48 held-out conversations; validation (teacher-forced sim_accept_length) after the last step.
# TARGET=qwen3: the tiny Qwen3 target instead of the config's Llama, for generate and train.
TARGET_ARG=(${TARGET:+target.path=examples/tiny/target-$TARGET})
TRAIN=(data.holdout=48 train.val_every_steps=100000 "${TRAIN_DEV[@]}" ${DRAFT:-} "${TARGET_ARG[@]}")
# NP: ranks (default NPROC); one sample cannot be split over two pairs, so the gate uses 2.
train() { run timeout 600 torchrun --standalone --nproc-per-node "${NP:-$NPROC}" -m colocate train --config $CFG "${TRAIN[@]}" "$@"; }
generate() { run timeout 600 python -m colocate generate --config $CFG --engine "$ENGINE" "${TARGET_ARG[@]}" "$@" "${GEN_DEV[@]}"; }
evaluate() {  # RUN_DIR OUT_JSON [eval args]: serve RUN_DIR/export on RUN_DIR's held-out prompts
  run timeout 900 python -m colocate eval --config "$1/config.yaml" --draft "$1/export" \
    --out "$2" --engine $EVAL_ENGINE "${@:3}"
  cp "$1/metrics.jsonl" "$OUT/$(basename "$2" .json)-metrics.jsonl" 2>/dev/null
}

# PROMPTS > 0: the target answers that many fresh prompts made by the tiny data generator
# (another seed) instead of the 500 bundled ones; AFTER_TRAIN: overrides for training.
prompts=examples/tiny/data/conversations.jsonl
if has after || has online; then
  if [ "${PROMPTS:-0}" -gt 0 ]; then
    prompts=runs/q-prompts.jsonl
    python - "$PROMPTS" "$prompts" <<'PY'
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("tiny_build", "examples/tiny/build.py")
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
with open(sys.argv[2], "w") as f:
    for record in build.generate_conversations(int(sys.argv[1]), seed=4321):
        f.write(json.dumps(record, sort_keys=True) + "\n")
PY
  fi
fi
if has after; then
  # KEEP_GEN=1: train on the answers an earlier run of this script generated (compare two
  # AFTER_TRAIN settings, e.g. engine.quantization=none vs fp8, on the same data).
  rm -rf runs/q-after
  if [ "${KEEP_GEN:-0}" != 1 ] || [ ! -f runs/q-gen.jsonl ]; then
    rm -rf runs/q-gen.jsonl runs/q-gen.jsonl.*
    generate --data "$prompts" --out runs/q-gen.jsonl
  fi
  cp runs/q-gen.jsonl.summary.json "$OUT/generate-tiny-summary.json" 2>/dev/null
  train run.dir=runs/q-after data.path=runs/q-gen.jsonl ${AFTER_TRAIN:-}
  evaluate runs/q-after "$OUT/eval-after.json"
fi
if has online; then
  rm -rf runs/q-online
  train run.dir=runs/q-online data.path="$prompts" data.source=generate generate.engine=$ENGINE \
    generate.chunk_records=${ONLINE_CHUNK:-128} "${TARGET_ARG[@]}" ${AFTER_TRAIN:-}
  evaluate runs/q-online "$OUT/eval-online.json"
fi
if has before; then  # the speed-up without the draft is measured in `after`
  rm -rf runs/q-before
  train run.dir=runs/q-before
  evaluate runs/q-before "$OUT/eval-before.json" eval.baseline=false
fi
if has gate; then
  # GATE_CASES: TARGET/KIND[/GENERATE_ENGINE]; the sample comes from that target's own answers
  # (16 prompts, 48 new tokens), generated by GENERATE_ENGINE (default ENGINE).
  rm -rf runs/q-gate-*
  for case in ${GATE_CASES:-qwen3/no_roundtrip llama/roundtrip}; do
    IFS=/ read -r target kind gen_engine <<<"$case"
    samples=runs/q-gate-$target; data=$samples/$kind.jsonl; dir=runs/q-gate-$target-$kind
    if [ ! -f "$samples.jsonl" ]; then
      ENGINE=${gen_engine:-$ENGINE} generate --out "$samples.jsonl" --limit 16 --max-new-tokens 48 \
        target.path=examples/tiny/target-$target
      run python tests/gpu/pick_samples.py "$samples.jsonl" --target examples/tiny/target-$target --out-dir "$samples"
    fi
    [ -f "$data" ] || { echo "gate: no $kind sample from target-$target" | tee -a "$LOG"; continue; }
    cp "$data" "$OUT/gate-$target-$kind-sample.jsonl"
    rm -rf "$dir"
    NP=2 train run.dir="$dir" data.path="$data" target.path=examples/tiny/target-$target data.holdout=0 \
      train.val_every_steps=0 train.max_steps=$GATE_STEPS train.lr=$GATE_LR train.micro_steps=1 train.warmup_steps=5 \
      checkpoint.every_steps=0
    evaluate "$dir" "$OUT/gate-$target-$kind.json" --data "$data" --limit 1 --max-new-tokens 48 eval.baseline=false
  done
fi
if has q8b; then
  bash examples/qwen3-8b-shape/prepare.sh | tee -a "$LOG"
  for graph in ${Q8B_GRAPHS:-false true}; do
    rm -rf runs/q8b-gen-$graph.jsonl*
    run timeout 600 python -m colocate generate --config examples/qwen3-8b-shape/run.yaml \
      --engine sglang --out runs/q8b-gen-$graph.jsonl --limit ${Q8B_PROMPTS:-256} --max-new-tokens 256 generate.cuda_graph=$graph
    cp runs/q8b-gen-$graph.jsonl.summary.json "$OUT/generate-q8b-cudagraph-$graph-summary.json" 2>/dev/null
  done
fi
python - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
# One table: served accept length (sglang, reference) next to the held-out simulation.
import glob, json, os, sys
out = sys.argv[1]
print(f"{'run':28s} {'served sglang':>13s} {'reference':>10s} {'rel diff':>9s} {'sim (val)':>10s} {'sim (train)':>11s}")
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    if "summary" in path:
        continue
    r = json.load(open(path))
    runs = r["runs"]
    sgl = runs.get("sglang", {}).get("accept_length")
    ref = runs.get("hf", {}).get("accept_length")
    rows = [json.loads(l) for l in open(path[:-5] + "-metrics.jsonl")] if os.path.exists(path[:-5] + "-metrics.jsonl") else []
    val = next((x["val_sim_accept_length"] for x in reversed(rows) if "val_sim_accept_length" in x), None)
    tr = rows[-1]["sim_accept_length"] if rows else None
    f = lambda x: "-" if x is None else f"{x:.2f}"
    diff = "-" if sgl is None or ref is None else f"{(sgl - ref) / ref:+.1%}"
    print(f"{os.path.basename(path)[:-5]:28s} {f(sgl):>13s} {f(ref):>10s} {diff:>9s} {f(val):>10s} {f(tr):>11s}")
PY
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$LOG"; fi
