"""Pick one-sample overfit cases from a `colocate generate` output.

    python tests/gpu/pick_samples.py GENERATED.jsonl --target DIR --out-dir DIR

Writes OUT_DIR/roundtrip.jsonl and OUT_DIR/no_roundtrip.jsonl: the first single-reply record
whose reply's decoded text tokenizes back to the target's own ids, and the first whose text
does not (training must then use the ids, not the text). Prints what it found; a kind that
the data does not hold is reported and not written.
"""

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("generated")
    ap.add_argument("--target", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--min-tokens", type=int, default=12)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from colocate.generate.rewrite import round_trips

    tok = AutoTokenizer.from_pretrained(args.target, local_files_only=True)
    special = tuple(tok.all_special_ids)
    found = {}
    with open(args.generated) as f:
        for line in f:
            record = json.loads(line)
            turns = record.get("messages") or record.get("conversations")
            replies = [t for t in turns if "token_ids" in t]
            if len(replies) != 1 or turns[-1] is not replies[0]:
                continue
            ids = replies[0]["token_ids"]
            if len([i for i in ids if i not in special]) < args.min_tokens:
                continue
            # The test `colocate generate` counts not_round_tripping with.
            kind = "roundtrip" if round_trips(tok, ids, special) else "no_roundtrip"
            text = tok.decode(ids, skip_special_tokens=True)
            if kind not in found:
                found[kind] = record
                print(f"{kind}: line {record['generated']['source_line']}, {len(ids)} tokens: "
                      f"{text[:60]!r}")
            if len(found) == 2:
                break
    os.makedirs(args.out_dir, exist_ok=True)
    for kind in ("roundtrip", "no_roundtrip"):
        if kind not in found:
            print(f"{kind}: none in {args.generated}")
            continue
        with open(os.path.join(args.out_dir, f"{kind}.jsonl"), "w") as f:
            f.write(json.dumps(found[kind]) + "\n")


if __name__ == "__main__":
    main()
