"""Re-read a `bench train` work dir (or its tarball from tests/gpu/run_bench.sh) and print
each mode's rate and engine-side shares twice: as the first bench computed them (host step
times, every step after the warm-up, one window for both sides) and as `summarize` gives them
now (the trainer's stream time, the engine's window shifted by the steps it runs ahead, the
trainer's last steps that ran without the engine left out); for an online-decode mode, also
its last whole decode cycle (the steady state). CPU only.

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
from colocate.bench.train import (MODES, PHASES, Result, engine_lead_steps, format_table,
                                  summarize)

TIMELINE_KEYS = {"stream_s", *(f"{p}_s" for p in PHASES)}


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
    # A mode's run dir: its key, or its key and the --sweep/--gpus tag (k3-engine_priority-low).
    runs = [(mode, name) for mode in MODES for name in sorted(os.listdir(workdir))
            if os.path.isdir(os.path.join(workdir, name))
            and (name == mode.key or name.startswith(mode.key + "-"))]
    for mode, name in runs:
        tag = name[len(mode.key) + 1:]
        path = os.path.join(workdir, name, "metrics.jsonl")
        if not os.path.exists(path):
            results.append(Result(mode, error="no metrics.jsonl: the run did not finish",
                                  tag=tag))
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        # Each mode's run dir keeps the config it ran with.
        saved = argparse.Namespace(config=os.path.join(workdir, name, "config.yaml"),
                                   overrides=[])
        lead = engine_lead_steps(saved, mode)
        # Before: host step times, no shift of the engine's window, no cool-down.
        host_only = [{k: v for k, v in r.items() if k not in TIMELINE_KEYS} for r in rows]
        old = summarize(mode, host_only, args.warmup)
        new = summarize(mode, rows, args.warmup, engine_lead=lead)
        new.tag = tag
        results.append(new)
        print(f"{new.label:<24}{old.tokens_per_s:>10,.0f} -> {new.tokens_per_s:>7,.0f}"
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
