"""Re-read a `bench train` work dir (or its tarball from tests/gpu/run_bench.sh) and print
each mode's engine-side shares and rate twice: as the bench printed them before the engine's
window was shifted by the steps it runs ahead, and as `summarize` gives them now; for an
online-decode mode, also its last whole decode cycle (the steady state). CPU only.

    python tests/gpu/resummarize_bench.py docs/gpu-logs/bench-h200/bench-sglang-h200-16k-work.tar.gz \
        --warmup 4
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile

from colocate.bench.train import MODES, engine_lead_steps, summarize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a bench work dir or its .tar.gz")
    p.add_argument("--warmup", type=int, required=True)
    args = p.parse_args()
    workdir = args.workdir
    if workdir.endswith(".tar.gz"):
        workdir = tempfile.mkdtemp(prefix="resummarize-")
        with tarfile.open(args.workdir) as tar:
            tar.extractall(workdir, filter="data")
    print(f"{'mode':<24}{'tok/s/GPU':>22}{'E wait':>22}{'E prefill':>22}   (before -> now)")
    for mode in MODES:
        path = os.path.join(workdir, mode.key, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        # Each mode's run dir keeps the config it ran with.
        saved = argparse.Namespace(config=os.path.join(workdir, mode.key, "config.yaml"),
                                   overrides=[])
        lead = engine_lead_steps(saved, mode)
        old = summarize(mode, rows, args.warmup)
        new = summarize(mode, rows, args.warmup, engine_lead=lead)
        print(f"{mode.label:<24}{old.tokens_per_s:>10,.0f} -> {new.tokens_per_s:>7,.0f}"
              f"{100 * old.engine_wait:>11.1f}% -> {100 * new.engine_wait:>5.1f}%"
              f"{100 * old.breakdown['engine prefill']:>11.1f}% -> "
              f"{100 * new.breakdown['engine prefill']:>5.1f}%")
        if new.cycle:
            print(f"  {new.cycle.describe()}")


if __name__ == "__main__":
    main()
