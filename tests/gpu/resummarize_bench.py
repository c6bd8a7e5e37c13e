"""Re-read a `bench train` work dir (or its tarball from tests/gpu/run_bench.sh) and print
each mode's engine-side shares and rate twice: as the bench printed them before the engine's
window was shifted by the steps it runs ahead, and as `summarize` gives them now; for an
online-decode mode, also its last whole decode cycle (the steady state). CPU only.

    python tests/gpu/resummarize_bench.py docs/gpu-logs/bench-h200/bench-sglang-h200-16k-work.tar.gz \
        --warmup 4

With --flops (the GFLOP/token pair the bench printed first) it also prints the bench's own
table from the modes that finished: for a device call cut off before the bench printed it.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile

from colocate import metrics
from colocate.bench.train import MODES, Result, engine_lead_steps, format_table, summarize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a bench work dir or its .tar.gz")
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--flops", help="ENGINE,TRAINER GFLOP/token (the bench's first line): "
                   "also print the bench table")
    p.add_argument("--device", default="NVIDIA H200", help="for the peak in the MFU column")
    args = p.parse_args()
    workdir = args.workdir
    if workdir.endswith(".tar.gz"):
        workdir = tempfile.mkdtemp(prefix="resummarize-")
        with tarfile.open(args.workdir) as tar:
            tar.extractall(workdir, filter="data")
    print(f"{'mode':<24}{'tok/s/GPU':>22}{'E wait':>22}{'E prefill':>22}   (before -> now)")
    results = []
    for mode in MODES:
        path = os.path.join(workdir, mode.key, "metrics.jsonl")
        if not os.path.exists(path):
            if os.path.isdir(os.path.join(workdir, mode.key)):
                results.append(Result(mode, error="no metrics.jsonl: the run did not finish"))
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        # Each mode's run dir keeps the config it ran with.
        saved = argparse.Namespace(config=os.path.join(workdir, mode.key, "config.yaml"),
                                   overrides=[])
        lead = engine_lead_steps(saved, mode)
        old = summarize(mode, rows, args.warmup)
        new = summarize(mode, rows, args.warmup, engine_lead=lead)
        results.append(new)
        print(f"{mode.label:<24}{old.tokens_per_s:>10,.0f} -> {new.tokens_per_s:>7,.0f}"
              f"{100 * old.engine_wait:>11.1f}% -> {100 * new.engine_wait:>5.1f}%"
              f"{100 * old.breakdown['engine prefill']:>11.1f}% -> "
              f"{100 * new.breakdown['engine prefill']:>5.1f}%")
        if new.cycle:
            print(f"  {new.cycle.describe()}")
    if args.flops:
        engine, trainer = (float(x) * 1e9 for x in args.flops.split(","))
        flops = {"engine": engine, "trainer": trainer, "both": engine + trainer}
        print()
        print(format_table(results, flops, metrics.peak_flops(args.device), args.device))


if __name__ == "__main__":
    main()
