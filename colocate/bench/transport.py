"""`colocate bench transport`: handoff latency and bandwidth of the ring, per backend and size.

    python -m colocate bench transport [--sizes-mb 1,4,16,64,256,512] [--iters 20] [--slots 2]

An engine and a trainer process (spawned, no torchrun) exchange one `payload` tensor per
message through the real ring. Two phases per size:

* latency: one message at a time; the engine's copy into the slot has completed before it
  publishes, and the trainer stamps once its stream waited on the slot's event and is idle.
  p50/p99 of publish -> usable is pure handoff (control message + event wait): no data moves,
  the trainer reads the slot in place.
* bandwidth: K slots in flight; the engine copies the payload into a slot, the trainer copies
  it out; GB/s = payload bytes / trainer wall time. Each byte is written once and read once,
  so this is the rate at which the ring can feed a consumer that copies what it gets.

CUDA IPC runs only where CUDA is available; both processes use GPU 0, as a pair does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from colocate.config import int_arg
from colocate.transport import Need, RingConsumer, RingProducer
from colocate.transport.local_pair import PairContext, run_local_pair

NEEDS = {"payload": Need(torch.uint8, (None,))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def bench_pair(ctx: PairContext, *, sizes: list[int], iters: int, slots: int) -> list[dict] | None:
    device, biggest = ctx.device, max(sizes)
    if ctx.engine:
        ring = RingProducer.start(ctx.channel, num_slots=slots, slot_bytes=biggest, device=device,
                                  name=f"colocate-bench-{id(ctx)}", timeout_s=ctx.timeout_s)
        src = torch.randint(0, 256, (biggest,), dtype=torch.uint8).to(device)
        for n in sizes:
            for phase in ("latency", "bandwidth"):
                for _ in range(iters + 2):  # two warm-up messages
                    w = ring.acquire()
                    w.alloc("payload", (n,), torch.uint8).copy_(src[:n])
                    if phase == "latency":
                        _sync(device)
                    ring.publish(w)
                    if phase == "latency":
                        ring.drain()
                ring.drain()
        ring.close()
        return None
    ring = RingConsumer.start(ctx.channel, device=device, needs=NEEDS, timeout_s=ctx.timeout_s)
    dst = torch.empty(biggest, dtype=torch.uint8, device=device)
    rows = []
    for n in sizes:
        latencies = []
        for i in range(iters + 2):
            with ring.receive() as d:
                _sync(device)
                if i >= 2:
                    latencies.append(time.monotonic_ns() - d.published_ns)
        for i in range(iters + 2):
            if i == 2:
                _sync(device)
                t0 = time.monotonic()
            with ring.receive() as d:
                dst[:n].copy_(d.tensors["payload"])
        _sync(device)
        seconds = time.monotonic() - t0
        latencies.sort()
        rows.append({"bytes": n, "p50_us": statistics.median(latencies) / 1e3,
                     "p99_us": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] / 1e3,
                     "gb_per_s": n * iters / seconds / 1e9})
    assert ring.receive() is None
    ring.close()
    return rows


def run(sizes_mb: list[float], iters: int, slots: int, backends: list[str]) -> list[dict]:
    sizes = [int(mb * (1 << 20)) for mb in sizes_mb]
    results = []
    for backend in backends:
        device = "cuda:0" if backend == "cuda_ipc" else "cpu"
        engine, trainer = run_local_pair(bench_pair, kwargs=dict(sizes=sizes, iters=iters,
                                                                 slots=slots),
                                         device=device, timeout_s=120.0, wall_s=1800.0)
        if not (engine.ok and trainer.ok):
            raise RuntimeError(f"bench {backend}: engine: {engine.error or engine.exitcode}; "
                               f"trainer: {trainer.error or trainer.exitcode}")
        results += [dict(row, backend=backend) for row in trainer.value]
    return results


def format_table(results: list[dict], slots: int, iters: int) -> str:
    lines = [f"ring transport: K={slots} slots, {iters} messages per size and phase",
             f"{'backend':<9} {'payload':>9} {'p50 us':>9} {'p99 us':>9} {'GB/s':>8}"]
    for r in results:
        mb = r["bytes"] / (1 << 20)
        lines.append(f"{r['backend']:<9} {mb:>6.0f} MB {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
                     f"{r['gb_per_s']:>8.2f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mb", default="1,4,16,64,256,512",
                   help="payload sizes in MiB, comma separated (512 MiB = 16k tokens x 4 x 4096 "
                        "x bf16)")
    p.add_argument("--iters", type=int_arg, default=20, help="timed messages per size and phase")
    p.add_argument("--slots", type=int_arg, default=2, help="ring slots (K)")
    p.add_argument("--backend", choices=["all", "shm", "cuda_ipc"], default="all")


def main(args: argparse.Namespace) -> int:
    sizes = [float(x) for x in args.sizes_mb.split(",") if x.strip()]
    if not sizes or min(sizes) <= 0 or args.iters < 1 or args.slots < 1:
        raise SystemExit("bench transport: --sizes-mb must be positive; --iters, --slots >= 1")
    backends = ["shm", "cuda_ipc"] if args.backend == "all" else [args.backend]
    if "cuda_ipc" in backends and not torch.cuda.is_available():
        if args.backend == "cuda_ipc":
            raise SystemExit("bench transport: --backend cuda_ipc needs a CUDA GPU")
        backends.remove("cuda_ipc")
        print("cuda_ipc: skipped (no CUDA GPU visible)")
    print(format_table(run(sizes, args.iters, args.slots, backends), args.slots, args.iters),
          flush=True)
    return 0
