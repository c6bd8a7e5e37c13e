"""Compare two `colocate generate` outputs of one input, e.g. the sglang engine against hf.

    python tests/gpu/generate_compare.py A.jsonl B.jsonl

Records are matched by their source line (either file may hold only the first N). Greedy
bf16 answers of two engines agree until a near-tie flips one token, so this reports how
many turns agree exactly and the mean share of each turn the two have in common before
the first difference, rather than demanding equality. Exits 1 when a matched record has a
different number of assistant turns (a real bug, not numerics) or nothing matches.
"""

from __future__ import annotations

import json
import sys


def _turns(record: dict) -> list[list[int]]:
    form = "messages" if "messages" in record else "conversations"
    return [m["token_ids"] for m in record[form] if "token_ids" in m]


def _load(path: str) -> dict[int, list[list[int]]]:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {r["generated"]["source_line"]: _turns(r) for r in records if "generated" in r}


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(a_path: str, b_path: str) -> int:
    a, b = _load(a_path), _load(b_path)
    common = sorted(set(a) & set(b))
    bad = [line for line in common if len(a[line]) != len(b[line])]
    pairs = [(x, y) for line in common if line not in bad for x, y in zip(a[line], b[line])]
    if not pairs:
        print(f"no common regenerated records between {a_path} and {b_path}")
        return 1
    exact = sum(x == y for x, y in pairs)
    prefix = sum(_shared(x, y) / max(len(x), len(y), 1) for x, y in pairs) / len(pairs)
    print(json.dumps({"records": len(common), "turns": len(pairs), "exact_turns": exact,
                      "exact_share": exact / len(pairs), "mean_shared_prefix": prefix,
                      "turn_count_mismatches": bad[:10]}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
