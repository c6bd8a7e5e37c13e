"""`colocate doctor`: check a host before a run (versions, GPUs, MPS, the ring, NUMA).

    python -m colocate doctor [--device auto|cuda|cpu] [--mps auto|required|off] [--timeout S]

One [ OK ] / [WARN] / [FAIL] / [ -- ] (skipped) line per finding, a summary, exit 1 iff a
required check failed. Checks run in threads bounded by --timeout (an exception: a FAIL line).
Ring checks run the real protocol in two processes, every byte verified; MPS checks start a
job-private daemon and always stop it.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import logging
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from colocate import mps, mps_daemon
from colocate.config import MpsSection, float_arg
from colocate.numa import numa_node_for_gpu, parse_cpulist
from colocate.selftest import NEEDS, consume, produce, slot_capacity
from colocate.transport import RingConsumer, RingProducer
from colocate.transport.local_pair import run_local_pair
from colocate.transport.slots import expandable_segments_env

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
_TAGS = {OK: "[ OK ]", WARN: "[WARN]", FAIL: "[FAIL]", SKIP: "[ -- ]"}
TORCH_RANGE = ((2, 6), (2, 13))
TRANSFORMERS_MIN = (5, 12)
RING_STEPS, RING_BYTES, RING_SLOTS = 20, 1 << 20, 2


@dataclass
class Result:
    name: str
    status: str
    detail: str
    required: bool | None = None  # None: as required as the check that produced it


@dataclass
class Ctx:
    device: str
    mps: str
    timeout_s: float
    num_gpus: int = 0
    mps_works: bool = False  # set by check_mps, read by check_cuda_ring


def format_result(r: Result) -> str:
    mark = " (required)" if r.status == FAIL and r.required else ""
    return f"{_TAGS[r.status]} {r.name:<18} {r.detail}{mark}"


def summarize(results: list[Result]) -> tuple[str, int]:
    """The summary line and the exit status (1 iff a required check failed)."""
    n = {s: sum(r.status == s for r in results) for s in _TAGS}
    blocking = [r.name for r in results if r.status == FAIL and r.required]
    line = f"doctor: {n[OK]} ok, {n[WARN]} warnings, {n[FAIL]} failed, {n[SKIP]} skipped: "
    if blocking:
        return line + f"NOT READY (required: {', '.join(blocking)})", 1
    return line + ("ready (the failures are not required)" if n[FAIL] else "ready"), 0


def run_check(name: str, fn: Callable[[Ctx], list[Result]], ctx: Ctx,
              required: bool) -> list[Result]:
    """``fn(ctx)`` in a thread bounded by ctx.timeout_s; exceptions and overruns become FAIL."""
    box: dict = {"error": f"no answer within {ctx.timeout_s:g}s (--timeout); abandoned"}

    def target() -> None:
        try:
            box["results"] = fn(ctx)
        except BaseException as e:  # noqa: BLE001 - one check must not end the command
            box["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"

    thread = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(ctx.timeout_s)
    results = box.get("results") or [Result(name, FAIL, box["error"])]
    for r in results:
        r.required = required if r.required is None else r.required
    return results


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("+")[0].split(".")[:2] if x.isdigit())


def _dist_version(name: str) -> str | None:
    return next((d.version for d in importlib.metadata.distributions(name=name)), None)


def check_versions(ctx: Ctx) -> list[Result]:
    good = TORCH_RANGE[0] <= _version_tuple(torch.__version__) <= TORCH_RANGE[1]
    out = [Result("python", OK, sys.version.split()[0]),
           Result("torch", OK if good else WARN, f"{torch.__version__} (CUDA "
                  f"{torch.version.cuda or 'none'})" + ("" if good else "; supported 2.6-2.13"))]
    for name in ("transformers", "safetensors", "psutil"):
        v = _dist_version(name)
        old = v and name == "transformers" and _version_tuple(v) < TRANSFORMERS_MIN
        out.append(Result(name, FAIL, "not installed (a dependency of colocate)", True) if not v
                   else Result(name, WARN, f"{v}; supported >= 5.12") if old
                   else Result(name, OK, v))
    v = _dist_version("sglang")
    out.append(Result("sglang", OK, v) if v else
               Result("sglang", SKIP, "not installed (needed for engine.backend=sglang)"))
    return out


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    proc = smi and subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
    if proc and proc.returncode == 0 and proc.stdout.strip():
        return f"driver {proc.stdout.split()[0]}"
    v = ctypes.c_int()
    ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
    return f"driver for CUDA {v.value // 1000}.{v.value % 1000 // 10} (no nvidia-smi)"


def check_gpus(ctx: Ctx) -> list[Result]:
    cvd = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    if ctx.device == "cpu":
        return [Result("gpu", SKIP, "skipped (--device cpu)")]
    if ctx.num_gpus == 0:
        why = f"no CUDA device (torch CUDA {torch.version.cuda or 'none'}, {cvd})"
        return [Result("gpu", FAIL, f"--device cuda but {why}; install a CUDA build of torch, "
                                    "or use --device cpu") if ctx.device == "cuda" else
                Result("gpu", SKIP, f"{why}: CPU-only: use --device cpu / run.device=cpu")]
    out = [Result("gpu", OK, f"{ctx.num_gpus} visible ({cvd}), {_driver_version()}")]
    for i in range(ctx.num_gpus):
        p = torch.cuda.get_device_properties(i)
        out.append(Result(f"gpu {i}", OK, f"{p.name}, {p.total_memory / 2**30:.1f} GiB, "
                                          f"compute capability {p.major}.{p.minor}"))
    return out


@contextmanager
def private_daemon(budget_s: float):
    """A job-private MPS daemon (fresh token) that is always stopped again; yields its plan."""
    plan = mps.plan_from_config(MpsSection(mode="required"),
                                f"{os.getuid()}-doctor-{secrets.token_hex(4)}")
    handle = mps_daemon.start_daemon(plan, budget_s)  # mode required: raises MpsError, never None
    try:
        yield plan
    finally:
        if not mps_daemon.stop_daemon(handle, timeout_s=min(max(budget_s, 5.0), 20.0)):
            raise mps.MpsError(f"the doctor's MPS daemon (pid {handle.pid}) did not exit; stop it: "
                               f"CUDA_MPS_PIPE_DIRECTORY={plan.pipe_dir} launch/mps.sh stop")


def check_mps(ctx: Ctx) -> list[Result]:
    if ctx.mps == "off" or (ctx.device == "cpu" and ctx.mps == "auto"):
        return [Result("mps", SKIP, f"--{'mps off' if ctx.mps == 'off' else 'device cpu'}")]
    bad = FAIL if ctx.mps == "required" else WARN
    binary = shutil.which(mps.CONTROL_BIN)
    out = [Result("mps binary", OK, binary) if binary else
           Result("mps binary", bad, f"{mps.CONTROL_BIN} not on PATH: no MPS, so trainer and "
                                     "engine time-slice each GPU")]
    if ctx.num_gpus == 0:
        why = "--device cpu" if ctx.device == "cpu" else "no CUDA device"
        return out + [Result("mps daemon", bad if bad == FAIL else SKIP, f"{why}: MPS needs a GPU")]
    if not binary:
        return out + [Result("mps daemon", SKIP, "no MPS binary")]
    t0 = time.monotonic()
    try:
        with private_daemon(ctx.timeout_s * 0.4) as plan:
            probe = mps_daemon.probe_client({**os.environ, **plan.env}, ctx.timeout_s * 0.2)
            if not probe.ok:
                raise mps.MpsError(f"client probe failed: {probe.detail}")
    except mps.MpsError as e:
        fallback = " (time-slicing fallback)" if bad == WARN else ""
        return out + [Result("mps daemon", bad, str(e).splitlines()[0] + fallback)]
    ctx.mps_works = True
    return out + [Result("mps daemon", OK, f"private daemon served {probe.num_devices} device(s); "
                         f"started, probed and stopped in {time.monotonic() - t0:.1f}s")]


def check_mps_stale(ctx: Ctx, tmp_dir: str | None = None) -> list[Result]:
    """MPS daemons of this user's jobs that died without stopping them (mps_owner.py);
    reported, not stopped: the next colocate job on the node stops them."""
    from colocate import mps_owner

    stale = mps_owner.stale_records(tmp_dir)
    if not stale:
        return [Result("mps stale", OK, "no daemon left behind by a dead job")]
    return [Result("mps stale", WARN, f"{r.describe()}; the next colocate job stops it, or now: "
                   f"CUDA_MPS_PIPE_DIRECTORY={r.pipe_dir} launch/mps.sh stop") for r in stale]


def ring_pair(pctx, steps: int, max_bytes: int, slots: int) -> dict | None:
    """run_local_pair body: selftest's deterministic traffic; the trainer checks every byte."""
    if pctx.engine:
        ring = RingProducer.start(pctx.channel, num_slots=slots, device=pctx.device,
                                  slot_bytes=slot_capacity(max_bytes), timeout_s=pctx.timeout_s,
                                  name=f"colocate-doctor-{os.getpid()}")
        produce(ring, steps=steps, max_bytes=max_bytes, pair=0, device=pctx.device)
        return None
    ring = RingConsumer.start(pctx.channel, device=pctx.device, needs=NEEDS,
                              timeout_s=pctx.timeout_s)
    report = consume(ring, steps=steps, max_bytes=max_bytes, pair=0, device=pctx.device)
    return {"steps": report.steps, "bytes": report.bytes, "mismatches": report.mismatches[:3],
            "p50_us": statistics.median(report.latency_ns or [0]) / 1e3, "backend": ring.slots.backend}


def _ring_result(name: str, device: str, budget_s: float, env: dict[str, str] | None = None,
                 bad: str = FAIL) -> Result:
    kwargs = {"steps": RING_STEPS, "max_bytes": RING_BYTES, "slots": RING_SLOTS}
    pair = run_local_pair(ring_pair, kwargs=kwargs, device=device, env=env, timeout_s=budget_s / 2,
                          wall_s=budget_s, grace_s=min(10.0, budget_s / 4))
    errors = [f"{r.role}: {r.error or f'exit code {r.exitcode}'}" for r in pair if not r.ok]
    if errors:
        return Result(name, bad, "; ".join(errors))
    v = pair[1].value
    if v["mismatches"] or v["steps"] != RING_STEPS:
        return Result(name, bad, f"data corrupted: {'; '.join(v['mismatches'])}")
    return Result(name, OK, f"{v['backend']} on {device}, K={RING_SLOTS}: {v['steps']} steps, "
                            f"{v['bytes'] / 1e6:.1f} MB verified, p50 handoff {v['p50_us']:.0f} us")


def check_cuda_ring(ctx: Ctx) -> list[Result]:
    """GPU 0 between two processes; once more under a private MPS daemon when MPS works."""
    if ctx.num_gpus == 0:
        why = "--device cpu" if ctx.device == "cpu" else "no CUDA device"
        return [Result("cuda ipc ring", FAIL if ctx.device == "cuda" else SKIP, why)]
    out = [_ring_result("cuda ipc ring", "cuda:0", ctx.timeout_s * 0.4)]
    if not ctx.mps_works:
        return out + [Result("cuda ipc ring+mps", SKIP, "MPS not in use (see above)")]
    bad = FAIL if ctx.mps == "required" else WARN
    try:
        with private_daemon(ctx.timeout_s * 0.15) as plan:
            out.append(_ring_result("cuda ipc ring+mps", "cuda:0", ctx.timeout_s * 0.3,
                                    plan.env, bad))
    except mps.MpsError as e:
        out.append(Result("cuda ipc ring+mps", bad, str(e).splitlines()[0]))
    out[-1].required = ctx.mps == "required"
    return out


def check_allocator(ctx: Ctx) -> list[Result]:
    key = expandable_segments_env()
    if key:
        return [Result("allocator", WARN, f"{key} enables expandable_segments: fine for the "
                       "models; ring slots are allocated outside them (their IPC would need "
                       "pidfd_getfd / CAP_SYS_PTRACE)")]
    return [Result("allocator", OK, "expandable_segments off")]


def check_numa(ctx: Ctx) -> list[Result]:
    lib = ctypes.util.find_library("numa")
    try:
        with open("/sys/devices/system/node/online") as f:
            num_nodes = len(parse_cpulist(f.read()))
    except OSError:
        num_nodes = 0
    nodes = f"{num_nodes} NUMA node(s)" if num_nodes else "NUMA layout unknown (no sysfs)"
    out = [Result("numa", OK, f"libnuma {lib}, {nodes}") if lib else
           Result("numa", WARN if num_nodes > 1 else OK,
                  f"libnuma not found (install libnuma1 for CPU locality), {nodes}")]
    for i in range(ctx.num_gpus):  # an unknown node matters only with several to choose from
        node, reason = numa_node_for_gpu(i)
        out.append(Result(f"numa gpu {i}", WARN if node is None and num_nodes > 1 else OK,
                          f"node {'unknown' if node is None else node}: {reason}"))
    return out


def checks(ctx: Ctx) -> list[tuple[str, Callable[[Ctx], list[Result]], bool]]:
    """(name, check, required) in the order they run; later checks read what earlier found."""
    on_gpu = ctx.num_gpus > 0 or ctx.device == "cuda"
    return [("versions", check_versions, False), ("gpu", check_gpus, ctx.device == "cuda"),
            # stale first: the mps check starts a daemon, which (as every job's start does)
            # stops stale daemons; reported before that, the user learns one was left behind.
            ("mps stale", check_mps_stale, False), ("mps", check_mps, ctx.mps == "required"),
            ("shm ring", lambda ctx: [_ring_result("shm ring", "cpu", ctx.timeout_s * 0.9)], True),
            ("cuda ipc ring", check_cuda_ring, on_gpu), ("allocator", check_allocator, False),
            ("numa", check_numa, False)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cuda: a GPU is required; cpu: skip the GPU checks")
    p.add_argument("--mps", default="auto", choices=["auto", "required", "off"],
                   help="required: an MPS failure fails the command (otherwise a warning)")
    p.add_argument("--timeout", type=float_arg, default=60.0, help="bound on each check (seconds)")


def main(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise SystemExit("doctor: --timeout must be > 0")
    if not os.environ.get("COLOCATE_DEBUG"):  # the report says it all; no daemon chatter
        logging.getLogger("colocate").setLevel(logging.WARNING)
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    ctx = Ctx(args.device, args.mps, args.timeout, torch.cuda.device_count() if use_cuda else 0)
    results: list[Result] = []
    for name, fn, required in checks(ctx):
        found = run_check(name, fn, ctx, required)
        print("\n".join(map(format_result, found)), flush=True)  # as they come: checks take time
        results += found
    line, code = summarize(results)
    print(line, flush=True)
    return code
