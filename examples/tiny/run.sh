#!/usr/bin/env bash
# The tiny demo: the whole quality loop on a built-in target, CPU or GPUs.
#   1. build the local tokenizer and target (seconds, cached; the target is trained briefly
#      on the bundled conversations, so it answers like them)
#   2. colocate generate: the target answers the bundled prompts itself, turn by turn,
#      keeping its own token ids (resumable; cached in RUN_DIR/generated.jsonl)
#   3. colocate train: an Eagle3 draft learns from those answers with the target on the
#      same devices; 48 conversations are held out, and validated on at the end
#   4. colocate eval: the draft is served on the 48 held-out prompts (greedy chain, 4 draft
#      tokens): the plain-torch reference decoder, plus sglang's EAGLE3 where sglang runs
# and prints the served accept length next to the training-time simulation.
#   bash examples/tiny/run.sh [key=value ...]   overrides for all three commands, e.g.
#   bash examples/tiny/run.sh train.max_steps=10 run.dir=runs/t2
# CPU: 4 ranks (2 pairs) with run.device=cpu. GPUs: 2 ranks per visible GPU.
# Knobs: NPROC (ranks per node), EVAL_ENGINE (auto|hf|sglang|both), COLOCATE_DEBUG=1.
# Relative paths (run.dir, data.path, ...) resolve from the directory you run it in, as
# with every colocate command; the demo's own files are passed as absolute paths.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # colocate, also when not pip-installed
python "$here/build.py" --out "$here" >/dev/null
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$((2 * gpus))}; device=()
else
  nproc=${NPROC:-4}; device=(run.device=cpu); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
config=$here/config.yaml
demo=(target.path="$here/target-llama" data.path="$here/data/conversations.jsonl")
run_dir=runs/tiny  # config.yaml's run.dir, unless overridden
for arg in "$@"; do case $arg in run.dir=*) run_dir=${arg#run.dir=} ;; esac; done
generated=$run_dir/generated.jsonl
# Pre-flight (about a second): the training config, overrides, paths and rank count.
python -m colocate check --config "$config" --nproc "$nproc" --gpus "$gpus" "${demo[@]}" \
  "${device[@]}" "$@"
echo "== 1/3 generate: the target answers the bundled prompts -> $generated"
python -m colocate generate --config "$config" --out "$generated" "${demo[@]}" "${device[@]}" \
  "$@"
echo "== 2/3 train: an Eagle3 draft on the target's answers"
# data.path last: a data.path among the overrides names generate's input, not training's.
torchrun --standalone --nproc-per-node "$nproc" -m colocate train --config "$config" \
  "${demo[@]}" "${device[@]}" "$@" data.path="$generated"
echo "== 3/3 eval: serve the draft on the held-out prompts"
python -m colocate eval --config "$run_dir/config.yaml" --draft "$run_dir/export" \
  --out "$run_dir/eval.json" --engine "${EVAL_ENGINE:-auto}"
python - "$run_dir" <<'PY'
import json, sys
run = sys.argv[1]
served = json.load(open(f"{run}/eval.json"))
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
val = next(r for r in reversed(rows) if "val_sim_accept_length" in r)
print(f"accept length on {served['num_prompts']} held-out prompts, {served['steps']} draft "
      f"tokens: served {served['accept_length']:.2f} ({served['engine']}) | simulated in "
      f"training {val['val_sim_accept_length']:.2f} (step {val['step']})")
PY
