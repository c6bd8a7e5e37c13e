#!/usr/bin/env bash
# DFlash served by sglang (speculative_algorithm=DFLASH) on one H200, repo root:
#   OUT=/tmp/out bash tests/gpu/run_dflash.sh         -> $OUT/dflash.log and one JSON per run
# For each tiny target (TARGETS, default "llama qwen3") a randomly initialised DFlash draft is
# exported (tests/eval_exports.py: write_random_dflash_export, block BLOCK_SIZE) and served
# by `colocate eval --engine both`: sglang's DFLASH decoder and the plain-torch reference
# (block drafting), each with the draft and with the target alone. TRAINED=RUN_DIR also
# serves RUN_DIR/export (a trained DFlash run) on TRAINED_TARGET (default the tiny Llama).
# The summary prints accept length and "same as target" (outputs with the draft identical to
# the target's greedy decode alone: lossless) per engine, and fails when any output differs
# (the random Qwen3 target's replies are near-ties in bf16: a flip there is reported as such,
# compare with the reference's count before calling it a bug).
# ENGINE=hf runs the same steps on the CPU (reference only): a dry run of this script.
# Needs the offline wheel bundle in .whl_sgl/ (docs/sglang.md) or sglang on PYTHONPATH.
set -uo pipefail
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colocate-dflash}; mkdir -p "$OUT"; LOG=$OUT/dflash.log
TARGETS=${TARGETS:-llama qwen3}
BLOCK_SIZE=${BLOCK_SIZE:-8}; PROMPTS=${PROMPTS:-16}; NEW_TOKENS=${NEW_TOKENS:-64}
ENGINE=${ENGINE:-sglang}
if [ "$ENGINE" = sglang ]; then EVAL=(--engine both); DEV=(); else EVAL=(--engine hf); DEV=(run.device=cpu); fi
run() { echo "=== $*" | tee -a "$LOG"; "$@" 2>&1 | grep -v "^W11\|^\*\*\*\*\|^Loading weights" | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }

if [ "$ENGINE" = sglang ] && [ ! -d "$SITE/sglang" ] && [ -d .whl_sgl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl_sgl/*.whl
fi
python examples/tiny/build.py --out examples/tiny 2>&1 | tail -2 | tee -a "$LOG"
CFG=examples/tiny/config.yaml
mkdir -p runs
evaluate() {  # EXPORT TARGET_DIR NAME
  run timeout 900 python -m colocate eval --config $CFG --draft "$1" --out "$OUT/$3.json" \
    "${EVAL[@]}" --limit "$PROMPTS" --max-new-tokens "$NEW_TOKENS" target.path="$2" "${DEV[@]}"
  cp "$1/config.json" "$OUT/$3-config.json" 2>/dev/null
}

for target in $TARGETS; do
  export_dir=runs/dflash-random-$target; rm -rf "$export_dir"
  run python -c "from tests.eval_exports import write_random_dflash_export as w; \
print(w('examples/tiny/target-$target', '$export_dir', block_size=$BLOCK_SIZE))"
  evaluate "$export_dir" examples/tiny/target-$target dflash-random-$target
done
if [ -n "${TRAINED:-}" ]; then
  evaluate "$TRAINED/export" "${TRAINED_TARGET:-examples/tiny/target-llama}" dflash-trained
fi

python - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
failed = False
print(f"{'run':24s} {'engine':7s} {'block':>5s} {'accept':>7s} {'same as target':>15s}  histogram")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "dflash-*.json"))):
    if path.endswith("-config.json"):
        continue
    r = json.load(open(path))
    for engine, run in r["runs"].items():
        same = run["same_output_as_target"]
        failed |= same != run["num_prompts"]
        print(f"{os.path.basename(path)[:-5]:24s} {engine:7s} {r['steps'] + 1:5d} "
              f"{run['accept_length']:7.3f} {same:>8}/{run['num_prompts']:<6d}  {run['histogram']}")
    if "same_outputs_hf_sglang" in r:
        print(f"{'':24s} sglang vs hf: same outputs {r['same_outputs_hf_sglang']}/{r['num_prompts']}, "
              f"accept length {r['accept_length_rel_diff']:+.1%}")
print("LOSSLESS: FAIL (an output with the draft differs from the target's alone)" if failed
      else "LOSSLESS: OK")
PY
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$LOG"; fi
