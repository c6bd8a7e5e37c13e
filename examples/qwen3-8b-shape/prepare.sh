#!/usr/bin/env bash
# Make what run.yaml points at: a target dir (this config.json + the tiny tokenizer) and a
# JSONL of RECORDS (default 256) long conversations (~2000 tokens each) built from the tiny
# bundled ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
python examples/tiny/build.py --out examples/tiny >/dev/null
mkdir -p runs/qwen3-8b-shape-target
cp examples/qwen3-8b-shape/config.json runs/qwen3-8b-shape-target/
cp examples/tiny/tokenizer/* runs/qwen3-8b-shape-target/
RECORDS=${RECORDS:-256} python - <<'PY'
import json, os
src = [json.loads(l) for l in open("examples/tiny/data/conversations.jsonl")]
def turns(rec):
    if "messages" in rec:
        return [(m["role"], m["content"]) for m in rec["messages"]]
    names = {"human": "user", "gpt": "assistant", "system": "system"}
    return [(names[t["from"]], t["value"]) for t in rec["conversations"]]
with open("runs/qwen3-8b-shape-data.jsonl", "w") as f:
    for i in range(int(os.environ["RECORDS"])):
        replies = []
        j = i
        while sum(len(r) for r in replies) < 4800:  # ~2000 tokens of the tiny tokenizer
            replies += [c for r, c in turns(src[j % len(src)]) if r == "assistant"]
            j += 7
        user = next(c for r, c in turns(src[i % len(src)]) if r == "user")
        f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": " ".join(replies)}]}) + "\n")
PY
echo "prepared runs/qwen3-8b-shape-target and runs/qwen3-8b-shape-data.jsonl"
