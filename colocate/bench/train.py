"""`colocate bench train --config CFG [key=value ...]`: does colocation pay on this GPU?

Runs the same model, data and micro-step budget in several modes, each a real
`torchrun --nproc-per-node 2 -m colocate train` on one GPU (one trainer/engine pair), and
prints one table:

  colocated K=2, K=3   MPS on, the engine prefills ahead into K ring slots
  serial K=1           MPS on, one slot: engine and trainer take turns
  time-sliced K=2      the same two processes without MPS (the GPU time-slices them)
  engine alone (E)     the trainer releases every micro-step unread (bench.trainer=discard)
  trainer alone (T)    the engine replays captured micro-steps (bench.engine=replay)
  pre-generated K=2    (--modes pregen,online) trained on `colocate generate`'s answers to
                       data.path's prompts, generated first (not timed)
  online decode K=2    data.source=generate: the engines answer the same prompts while
                       training runs, every record decoded (generate.keep_greedy_mb=0);
                       its row adds the decode rate (first pair x pairs)

From E and T come two disaggregated references per GPU: the 1:1 split min(E, T)/2 and the
ideal split 1/(1/E + 1/T) (engine GPUs in exact proportion to their load, free transport).
Each mode's first --warmup steps (compilation, allocator warm-up) are left out, and where
both sides work, the last ceil(K / micro-steps) (the engine has finished; see `summarize`).
A step's time is the trainer's CUDA-stream time (`step_seconds`), as metrics.jsonl logs it.
`--sweep key=v1,v2,...` runs the chosen modes once per value of one config key (an SM or
memory split, the micro-step token budget) and prints one row per (value, mode); the
ratio columns of a row use the reference rows of the same value.
`--gpus 1,2` runs them once per GPU count (2 x N ranks, one pair per GPU; every rate is per
GPU) and adds a scaling line per mode: its rate per GPU on N GPUs against one GPU's.
Columns: tokens/s per GPU, MFU (metrics.py; both processes share the GPU's peak), ratios to
time-sliced / ideal / 1:1, the share of wall time each side waited for the other, the
trainer's host time in ring calls (handoff) as a share of the step, peak memory per role;
then a step-time breakdown: the engine's prefill time and the trainer's phases (receive,
teacher distribution, forward, backward, optimizer) as shares of wall time.
On a machine without CUDA the MPS modes are reported as unavailable, not faked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from colocate import metrics as m
from colocate.config import float_arg, int_arg, load_config


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    overrides: tuple[str, ...]
    needs_mps: bool = False
    work: str = "both"  # which FLOPs it does: both, engine, trainer


MODES = (
    Mode("k2", "colocated MPS K=2", ("transport.num_slots=2", "mps.mode=required"), True),
    Mode("k3", "colocated MPS K=3", ("transport.num_slots=3", "mps.mode=required"), True),
    Mode("k1", "serial MPS K=1", ("transport.num_slots=1", "mps.mode=required"), True),
    Mode("ts", "time-sliced K=2", ("transport.num_slots=2", "mps.mode=off")),
    Mode("engine", "engine alone (E)", ("bench.trainer=discard", "mps.mode=off"), work="engine"),
    Mode("trainer", "trainer alone (T)", ("bench.engine=replay", "mps.mode=off"), work="trainer"),
    # Online decode against training on a file of the same answers, generated first.
    Mode("pregen", "pre-generated K=2", ("transport.num_slots=2", "mps.mode=auto")),
    # Every record decoded: kept greedy answers would turn later epochs into pre-generated
    # training, and the row measures answering while training.
    Mode("online", "online decode K=2", ("transport.num_slots=2", "mps.mode=auto",
                                         "data.source=generate", "generate.keep_greedy_mb=0")),
)
DEFAULT_MODES = ("k2", "k3", "k1", "ts", "engine", "trainer")


# The trainer's phases as `PhaseTimer` marks them (trainer.py), in step order.
PHASES = ("receive", "teacher", "forward", "backward", "optimizer")


def step_seconds(row: dict) -> float:
    """A step's time on the trainer's timeline: its stream time (`stream_s`, mark to mark;
    metrics.MetricsLog), summed from the phases in logs written before that key, or the
    host's step time where no phase was timed. The host's alone is no measure: it runs
    ahead of the GPU by up to a step, so a window's ends move by that much."""
    if "stream_s" in row:
        return row["stream_s"]
    phases = [row[f"{p}_s"] for p in PHASES if f"{p}_s" in row]
    return sum(phases) if phases else row["step_s"]


@dataclass
class Result:
    mode: Mode
    error: str = ""
    tokens_per_s: float = 0.0
    trainer_wait: float = 0.0
    engine_wait: float = 0.0
    handoff: float = 0.0
    trainer_gib: float = 0.0
    engine_gib: float = 0.0
    breakdown: dict | None = None  # share of wall time per role and phase
    tag: str = ""  # the --sweep value and GPU count of this row ("" without either)
    decode_tokens_per_s: float = 0.0  # online decode: tokens the target generated
    decode_buffered: float = 0.0  # online decode: share of the window's records answered before it
    cycle: DecodeCycle | None = None  # online decode: the window's last whole decode cycle
    gpus: int = 1  # one trainer/engine pair per GPU; every rate is per GPU
    sweep: str = ""  # the --sweep override of this row ("" without a sweep)

    @property
    def label(self) -> str:
        return f"{self.mode.label} {self.tag}" if self.tag else self.mode.label


def summarize(mode: Mode, rows: list[dict], warmup: int, gpus: int = 1,
              engine_lead: int = 0) -> Result:
    """Steady-state numbers from metrics.jsonl rows (cumulative counters are differenced).

    Each side's shares are taken on its own timeline: the trainer's waits and phases over
    the trainer's step time (`step_seconds`), the engine's wait and prefill over the
    engine's clock. A row carries the engine's counters as of the step's last message,
    which the engine sent up to K messages (`engine_lead` steps: ceil(K / micro-steps))
    before the trainer took it; so the engine's window starts `engine_lead` rows later than
    the trainer's, or its first messages would count the slot waits the trainer's warm-up
    caused. For the same reason the trainer's window ends `engine_lead` rows before the
    last where both sides work: the engine has made its last message by then, and the
    trainer's last steps run on a GPU of its own (on an H200, K=3: 0.46 s a step instead
    of 0.85 s, a 9% higher rate over a 10-step window). Tokens/s come from the trainer's
    steps, except engine-alone, where the trainer discards instantly and messages buffered
    at the window's start would inflate its rate: that row uses the engine's clock over the
    engine's window.
    """
    cooldown = engine_lead if mode.work == "both" else 0
    if len(rows) <= warmup + cooldown:
        return Result(mode, error=f"only {len(rows)} steps, need more than --warmup {warmup}"
                      + (f" + the engine's lead {cooldown}" if cooldown else ""), gpus=gpus)
    before, timed = rows[warmup - 1] if warmup else None, rows[warmup:len(rows) - cooldown]
    seconds = sum(step_seconds(r) for r in timed)
    start = warmup - 1 + engine_lead  # the row the engine's window starts after
    if start >= len(rows) - 1:  # too short a window to shift: the trainer's
        start = warmup - 1
    engine_before, engine_rows = (rows[start] if start >= 0 else None), rows[start + 1:]
    engine_seconds = rows[-1].get("engine_clock_s", 0.0) - (
        engine_before.get("engine_clock_s", 0.0) if engine_before else 0.0)
    if engine_seconds <= 0:  # metrics from before the engine clock existed
        engine_seconds, engine_before, engine_rows = seconds, before, timed

    def delta(key: str, since: dict | None = before) -> float:
        return timed[-1][key] - (since[key] if since else 0.0)

    tokens = sum(r["tokens"] for r in timed) / gpus  # metrics count every trainer's tokens
    engine_tokens = sum(r["tokens"] for r in engine_rows) / gpus
    # Online decode: the first pair's engine counts its own answers; every pair decodes alike.
    decode = delta("decode_tokens") / seconds if "decode_tokens" in timed[-1] else 0.0
    buffered = decode_buffered(before, timed[-1]) if "decode_ahead" in timed[-1] else 0.0

    def engine_delta(key: str) -> float:
        return engine_rows[-1][key] - (engine_before[key] if engine_before else 0.0)

    breakdown = {"engine prefill": engine_delta("engine_prefill_s") / engine_seconds}
    for phase in PHASES:
        breakdown[f"trainer {phase}"] = sum(r.get(f"{phase}_s", 0.0) for r in timed) / seconds
    return Result(mode, breakdown=breakdown,
                  tokens_per_s=(engine_tokens / engine_seconds if mode.work == "engine"
                                else tokens / seconds),
                  trainer_wait=delta("trainer_wait_s") / seconds,
                  engine_wait=engine_delta("engine_wait_s") / engine_seconds,
                  handoff=delta("handoff_s") / seconds, trainer_gib=timed[-1]["trainer_peak_gib"],
                  engine_gib=timed[-1]["engine_peak_gib"], decode_tokens_per_s=decode,
                  decode_buffered=buffered, cycle=last_decode_cycle(rows, warmup, gpus),
                  gpus=gpus)


@dataclass
class DecodeCycle:
    """Online decode's steady state: the steps from one answered chunk's arrival to the
    next's. A window that starts with answers buffered (decoded while the trainer warmed up)
    shows a rate that lasts only as long as the buffer; a whole cycle, whose trainer waits
    for the next chunk at its end as it would all run long, does not."""

    first_step: int
    last_step: int
    tokens_per_s: float  # trained, per GPU
    trainer_wait: float  # share of the cycle's step time
    decode_tokens_per_s: float  # answered by the first pair's engine

    def describe(self) -> str:
        return (f"last whole decode cycle (steps {self.first_step}-{self.last_step}, chunk "
                f"arrival to arrival): {self.tokens_per_s:,.0f} tok/s/GPU trained, trainer wait "
                f"{100 * self.trainer_wait:.1f}%, the target generated "
                f"{self.decode_tokens_per_s:,.0f} tok/s per engine")


def last_decode_cycle(rows: list[dict], warmup: int, gpus: int = 1) -> DecodeCycle | None:
    """The last cycle inside the timed window: the steps after one arrival (a row whose
    `decode_records` grew) up to and including the next. None without two arrivals there.
    Records served from kept greedy answers (`decode_reused`) are no arrivals: nothing is
    decoded for them, so they have no cycle to measure."""
    if "decode_records" not in rows[-1]:
        return None
    arrivals = [i for i in range(max(warmup, 1), len(rows))
                if rows[i]["decode_records"] > rows[i - 1]["decode_records"]]
    if len(arrivals) < 2:
        return None
    start, end = arrivals[-2], arrivals[-1]
    cycle = rows[start + 1:end + 1]
    seconds = sum(step_seconds(r) for r in cycle)
    return DecodeCycle(
        first_step=rows[start + 1].get("step", start + 2),  # rows are steps 1, 2, ...
        last_step=rows[end].get("step", end + 1),
        tokens_per_s=sum(r["tokens"] for r in cycle) / gpus / seconds,
        trainer_wait=(rows[end]["trainer_wait_s"] - rows[start]["trainer_wait_s"]) / seconds,
        decode_tokens_per_s=(rows[end]["decode_tokens"] - rows[start]["decode_tokens"]) / seconds)


def decode_buffered(before: dict | None, last: dict) -> float:
    """The share of the records packed in the timed window that had been answered before it
    began (`decode_ahead` at its start). Those were decoded while the trainer warmed up, so
    the window's rate holds only as long as such a buffer lasts."""
    def packed(row: dict | None) -> float:  # answered (decoded or reused) minus not yet packed
        return row["decode_records"] + row["decode_reused"] - row["decode_ahead"] if row else 0
    in_window = packed(last) - packed(before)
    ahead = before["decode_ahead"] if before else 0
    return min(ahead, in_window) / in_window if in_window > 0 else 0.0


def row_tag(sweep: str, gpus: int, several_counts: bool) -> str:
    """Row label suffix: the --sweep override's last key part and value
    (mps.engine_sm_percent=70 -> engine_sm_percent=70), then `gpus=N` when --gpus lists
    several counts or one above 1."""
    parts = [sweep.split(".")[-1]] if sweep else []
    if several_counts or gpus > 1:
        parts.append(f"gpus={gpus}")
    return " ".join(parts)


def engine_lead_steps(args: argparse.Namespace, mode: Mode, sweep: str = "") -> int:
    """Optimizer steps the engine runs ahead of the trainer: ceil(slots / micro-steps)."""
    cfg = load_config(args.config, [*args.overrides, *([sweep] if sweep else []),
                                    *mode.overrides])
    return -(-cfg.transport.num_slots // cfg.train.micro_steps)


def run_mode(mode: Mode, args: argparse.Namespace, workdir: str, device: str,
             sweep: str = "", extra: tuple[str, ...] = (), gpus: int = 1,
             tag: str = "") -> Result:
    """One mode as a real torchrun job on `gpus` GPUs (two ranks each); `sweep` is one
    extra key=value override, `extra` more (the pre-generated file's path)."""
    name = mode.key + (f"-{tag.replace('=', '-').replace(' ', '-')}" if tag else "")
    run_dir = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={2 * gpus}",
           "-m", "colocate", "train", *(["--config", args.config] if args.config else []),
           *args.overrides, *([sweep] if sweep else []), *mode.overrides, *extra,
           f"run.dir={run_dir}", f"train.max_steps={args.steps}", "train.epochs=0",
           "checkpoint.every_steps=0",
           "checkpoint.resume=never", "train.log_every_s=30",
           # Timed steps train only: no validation passes, no served evaluations.
           "train.val_every_steps=0", "eval.every_steps=0", "eval.at_end=false"]
    if device == "cpu":
        cmd.append("run.device=cpu")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"bench train: {mode.label} {tag} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Result(mode, error=f"timed out after {args.timeout} s", tag=tag, gpus=gpus)
    print(f"bench train: {mode.label} {tag} done in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    with open(os.path.join(workdir, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate train: error")]
        return Result(mode, error=(lines[-1] if lines else f"exit {proc.returncode}")[:160],
                      tag=tag, gpus=gpus)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        result = summarize(mode, [json.loads(line) for line in f], args.warmup, gpus,
                           engine_lead=engine_lead_steps(args, mode, sweep))
    result.tag = tag
    return result


def pregenerate(args: argparse.Namespace, workdir: str, cuda: bool) -> str:
    """`colocate generate` over data.path with the run's generate.* settings: the file the
    pregen mode trains on (online decode answers the same prompts alike)."""
    out = os.path.join(workdir, "pregenerated.jsonl")
    cmd = [sys.executable, "-m", "colocate", "generate", *(["--config", args.config]
           if args.config else []), "--out", out, *args.overrides,
           *([] if cuda else ["run.device=cpu"])]
    print("bench train: generating the pre-generated answers ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    with open(os.path.join(workdir, "pregenerate.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench train: colocate generate failed (exit {proc.returncode}); "
                         f"see {workdir}/pregenerate.log:\n{proc.stderr[-2000:]}")
    return out


def format_table(results: list[Result], flops: dict[str, float], peak: float | None,
                 device_name: str) -> str:
    width = max([20] + [len(r.label) for r in results])
    refs_by_tag: dict[str, dict[str, float]] = {}  # references per sweep value
    for tag in dict.fromkeys(r.tag for r in results):
        by_key = {r.mode.key: r for r in results if not r.error and r.tag == tag}
        e, t, ts = by_key.get("engine"), by_key.get("trainer"), by_key.get("ts")
        refs = m.disaggregated_references(e.tokens_per_s, t.tokens_per_s) if e and t else {}
        if ts:
            refs["ts"] = ts.tokens_per_s
        refs_by_tag[tag] = refs

    def ratio(x: float, ref: float | None) -> str:
        return f"{x / ref:.2f}x" if ref else "--"

    head = (f"{'mode':<{width}} {'tok/s/GPU':>10} {'MFU':>6} {'vs ts':>6} {'vs ideal':>8} "
            f"{'vs 1:1':>7} {'T wait':>7} {'E wait':>7} {'handoff':>8} {'T GiB':>6} {'E GiB':>6}")
    lines = [f"bench train on {device_name}: flops/token engine {flops['engine'] / 1e9:.2f} G, "
             f"trainer {flops['trainer'] / 1e9:.2f} G; peak "
             f"{peak / 1e12:.0f} TFLOP/s" if peak else f"bench train on {device_name}: peak "
             "unknown (MFU not computed)", head]
    for r in results:
        if r.error:
            lines.append(f"{r.label:<{width}} {'unavailable: ' + r.error}")
            continue
        refs = refs_by_tag[r.tag]
        util = f"{100 * m.mfu(flops[r.mode.work], r.tokens_per_s, peak):.1f}%" if peak else "--"
        lines.append(
            f"{r.label:<{width}} {r.tokens_per_s:>10,.0f} {util:>6} "
            f"{ratio(r.tokens_per_s, refs.get('ts')):>6} "
            f"{ratio(r.tokens_per_s, refs.get('split_ideal')):>8} "
            f"{ratio(r.tokens_per_s, refs.get('split_1to1')):>7} {100 * r.trainer_wait:>6.1f}% "
            f"{100 * r.engine_wait:>6.1f}% {100 * r.handoff:>7.2f}% {r.trainer_gib:>6.1f} "
            f"{r.engine_gib:>6.1f}")
    for tag, refs in refs_by_tag.items():
        for key, label in (("split_ideal", "ideal split"), ("split_1to1", "1:1 split")):
            if key in refs:
                name = f"{label} (ref){' ' + tag if tag else ''}"
                lines.append(f"{name:<{width}} {refs[key]:>10,.0f}")
    for tag in dict.fromkeys(r.tag for r in results):
        by_key = {r.mode.key: r for r in results if not r.error and r.tag == tag}
        online, pregen = by_key.get("online"), by_key.get("pregen")
        if online:
            lines.append(f"online decode{' ' + tag if tag else ''}: the target generated "
                         f"{online.decode_tokens_per_s:,.0f} tok/s per engine while training; "
                         f"{100 * online.decode_buffered:.0f}% of the records trained in the "
                         "window were answered before it began"
                         + (" (a longer window shows the steady state)"
                            if online.decode_buffered > 0.1 else ""))
        if online and online.cycle:
            c = online.cycle
            lines.append(f"online decode{' ' + tag if tag else ''}, {c.describe()}"
                         + (f"; {c.tokens_per_s / pregen.tokens_per_s:.2f}x pre-generated"
                            if pregen and pregen.tokens_per_s else ""))
        elif online:
            lines.append(f"online decode{' ' + tag if tag else ''}: no whole decode cycle in "
                         "the window (two chunk arrivals); run more --steps for the steady state")
        if online and pregen and pregen.tokens_per_s:
            lines.append(f"online / pre-generated{' ' + tag if tag else ''}: "
                         f"{online.tokens_per_s / pregen.tokens_per_s:.2f}x tokens/s; trainer "
                         f"wait {100 * online.trainer_wait:.1f}% (pre-generated "
                         f"{100 * pregen.trainer_wait:.1f}%)")
    lines += scaling_lines(results)
    lines += ["", "step-time breakdown, share of wall time (trainer phases: time between marks, "
              "GPU-stream time on CUDA; 'receive' includes waiting for the engine's data)",
              f"{'mode':<{width}} {'E prefill':>9} " + " ".join(f"{'T ' + p:>11}" for p in PHASES)]
    for r in results:
        if r.breakdown:
            b = r.breakdown
            lines.append(f"{r.label:<{width}} {100 * b['engine prefill']:>8.1f}% " + " ".join(
                f"{100 * b['trainer ' + p]:>10.1f}%" for p in PHASES))
    return "\n".join(lines)


def scaling_lines(results: list[Result]) -> list[str]:
    """--gpus: each mode's rate per GPU on N GPUs as a share of its rate on one (same sweep
    value); 100% is perfect scaling."""
    one = {(r.mode.key, r.sweep): r for r in results if r.gpus == 1 and not r.error}
    lines = []
    for r in results:
        base = one.get((r.mode.key, r.sweep))
        if r.gpus > 1 and not r.error and base is not None and base.tokens_per_s:
            lines.append(f"scaling, {r.label}: {r.tokens_per_s:,.0f} tok/s per GPU = "
                         f"{100 * r.tokens_per_s / base.tokens_per_s:.1f}% of one GPU's "
                         f"{base.tokens_per_s:,.0f}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="the run config to benchmark")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    # 18 - 5 - K=3's lead of 3 leaves 10 timed steps at one micro-step per step.
    p.add_argument("--steps", type=int_arg, default=18, help="optimizer steps per mode")
    p.add_argument("--warmup", type=int_arg, default=5, help="steps left out of each mode's "
                   "numbers (and, where both sides work, the engine's lead at the end)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma list of: " + ", ".join(mode.key for mode in MODES))
    p.add_argument("--timeout", type=float_arg, default=900.0, help="seconds per mode")
    p.add_argument("--workdir", default="", help="keep each mode's run dir and log here")
    p.add_argument("--sweep", default="", metavar="KEY=V1,V2,...",
                   help="run the modes once per value of this config key, e.g. "
                        "mps.engine_sm_percent=100,60,40")
    p.add_argument("--gpus", default="1", metavar="N1,N2,...",
                   help="GPU counts to run the modes on (one pair per GPU), e.g. 1,2: rates "
                        "stay per GPU and a scaling line compares each count with one GPU")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config
    sweeps = [""]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if not key or not values:
            raise SystemExit(f"bench train: --sweep {args.sweep!r}: use KEY=V1,V2,... "
                             "(e.g. mps.engine_sm_percent=100,60,40)")
        sweeps = [f"{key}={v}" for v in values.split(",") if v]
        for sweep in sweeps:  # fail fast on a bad key or value, before any run
            load_config(args.config, [*args.overrides, sweep])
    try:
        gpu_counts = [int(n) for n in args.gpus.split(",") if n]
    except ValueError:
        gpu_counts = []
    if not gpu_counts or min(gpu_counts) < 1:
        raise SystemExit(f"bench train: --gpus {args.gpus!r}: use GPU counts, e.g. 1,2")
    wanted = [k for k in args.modes.split(",") if k]
    unknown = set(wanted) - {mode.key for mode in MODES}
    if unknown:
        raise SystemExit(f"bench train: unknown --modes {sorted(unknown)}")
    cuda = torch.cuda.is_available()
    # The engine runs `lead` steps ahead: the trainer's last `lead` steps are not timed.
    lead = max((engine_lead_steps(args, mode, sweep) for mode in MODES for sweep in sweeps
                if mode.key in wanted and mode.work == "both" and (cuda or not mode.needs_mps)),
               default=0)
    if args.steps <= args.warmup + lead:
        raise SystemExit(f"bench train: --steps must exceed --warmup + the engine's lead "
                         f"({args.warmup} + {lead}): raise --steps")
    timed = (args.steps - args.warmup - lead) * cfg.train.micro_steps
    if timed < 10:
        print(f"bench train: warning: only {timed} timed micro-steps per mode (after "
              f"--warmup {args.warmup} and the engine's lead {lead}): raise --steps",
              file=sys.stderr)
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="colocate-bench-")
    os.makedirs(workdir, exist_ok=True)
    results = []
    extra = {"pregen": (f"data.path={pregenerate(args, workdir, cuda)}",)} \
        if "pregen" in wanted else {}
    available = torch.cuda.device_count() if cuda else None  # CPU: ranks, not devices
    for gpus in gpu_counts:
        for sweep in sweeps:
            tag = row_tag(sweep, gpus, len(gpu_counts) > 1)
            for mode in (mode for mode in MODES if mode.key in wanted):
                error = ""
                if mode.needs_mps and not cuda:
                    error = "MPS needs a CUDA GPU"
                elif available is not None and gpus > available:
                    error = f"needs {gpus} GPUs, this host has {available}"
                result = (Result(mode, error=error, tag=tag, gpus=gpus) if error else
                          run_mode(mode, args, workdir, "cuda" if cuda else "cpu", sweep,
                                   extra.get(mode.key, ()), gpus, tag))
                result.sweep = sweep
                results.append(result)
    peak = m.peak_flops(device_name) if cuda else None
    table = format_table(results, m.colocated_flops_per_token(cfg), peak, device_name)
    print(table, flush=True)
    with open(os.path.join(workdir, "table.txt"), "w") as f:
        f.write(table + "\n")
    return 0 if any(not r.error for r in results) else 1
