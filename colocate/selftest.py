"""`colocate selftest`: the ring end to end with a synthetic engine and a checking trainer.

    torchrun --nproc-per-node 2G -m colocate selftest [--slots K] [--steps N] [--bytes B]

Each engine writes, for every step, deterministic tensors of a step-dependent size (a
uint8 payload between B/4 and B bytes, a float32 block and an int64 header) straight into
its ring slot; its trainer recomputes what it must have received and compares bit for bit.
Handoff latency is measured from the engine's publish (after its writes completed) to the
trainer holding usable data (after its stream waited on the slot's event); throughput is
payload bytes over the trainer's wall time, pipelining included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from colocate.config import float_arg, int_arg
from colocate.transport import Need, RingConsumer, RingProducer, layout_bytes, open_pair_channel

NEEDS = {"header": Need(torch.int64, (3,)), "payload": Need(torch.uint8, (None,)),
         "values": Need(torch.float32, (None, 4))}


def payload_bytes(step: int, pair: int, max_bytes: int) -> int:
    """Deterministic size in [max_bytes/4, max_bytes], varying with step and pair."""
    frac = 0.25 + 0.75 * (((step * 37 + pair * 11) % 16) / 15)
    return max(1, int(max_bytes * frac))


def slot_capacity(max_bytes: int) -> int:
    return layout_bytes([((3,), torch.int64), ((max_bytes,), torch.uint8),
                         ((max_bytes // 64 + 1, 4), torch.float32)])


def _base(max_bytes: int, pair: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1234 + pair)
    return torch.randint(0, 256, (max_bytes,), dtype=torch.uint8, generator=g).to(device)


def _expected(base: torch.Tensor, step: int, pair: int, max_bytes: int):
    n = payload_bytes(step, pair, max_bytes)
    payload = torch.bitwise_xor(base[:n], (step * 7 + pair) % 256)
    rows = n // 64 + 1
    values = torch.arange(rows * 4, device=base.device, dtype=torch.float32).view(rows, 4) + step
    header = torch.tensor([step, pair, n], dtype=torch.int64, device=base.device)
    return header, payload, values


@dataclass
class PairReport:
    pair: int
    steps: int = 0
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    wait_s: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def produce(ring: RingProducer, *, steps: int, max_bytes: int, pair: int,
            device: torch.device, sync: bool = True) -> None:
    base = _base(max_bytes, pair, device)
    for step in range(steps):
        header, payload, values = _expected(base, step, pair, max_bytes)
        w = ring.acquire()
        w.put("header", header)
        w.put("payload", payload)
        w.put("values", values)
        if sync:  # so the latency clock starts when the data is really there
            _sync(device)
        ring.publish(w)
    ring.close()


def consume(ring: RingConsumer, *, steps: int, max_bytes: int, pair: int,
            device: torch.device) -> PairReport:
    base = _base(max_bytes, pair, device)
    report = PairReport(pair)
    t0 = time.monotonic()
    while (d := ring.receive()) is not None:
        with d:
            _sync(device)
            report.latency_ns.append(time.monotonic_ns() - d.published_ns)
            header, payload, values = _expected(base, d.step, pair, max_bytes)
            for name, want in (("header", header), ("payload", payload), ("values", values)):
                got = d.tensors[name]
                if got.shape != want.shape or not torch.equal(got, want):
                    report.mismatches.append(f"pair {pair} step {d.step}: '{name}' differs")
            report.bytes += payload.numel()
            report.steps += 1
    report.wall_s = time.monotonic() - t0
    report.wait_s = ring.stats.wait_s
    ring.close()
    if report.steps != steps:
        report.mismatches.append(f"pair {pair}: received {report.steps} steps, expected {steps}")
    return report


def format_reports(reports: list[PairReport], *, slots: int, backend: str) -> str:
    lines = [f"colocate selftest: backend={backend} slots={slots}",
             f"{'pair':>4} {'steps':>6} {'MB':>9} {'p50 us':>9} {'p99 us':>9} {'GB/s':>7} "
             f"{'wait %':>7} {'result':>8}"]
    for r in reports:
        lat = sorted(r.latency_ns) or [0]
        p50 = statistics.median(lat) / 1e3
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] / 1e3
        gbs = r.bytes / r.wall_s / 1e9 if r.wall_s else 0.0
        wait = 100 * r.wait_s / r.wall_s if r.wall_s else 0.0
        lines.append(f"{r.pair:>4} {r.steps:>6} {r.bytes / 1e6:>9.1f} {p50:>9.1f} {p99:>9.1f} "
                     f"{gbs:>7.2f} {wait:>7.1f} {'OK' if not r.mismatches else 'MISMATCH':>8}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots", type=int_arg, default=2, help="ring slots per pair (K)")
    p.add_argument("--steps", type=int_arg, default=50, help="messages per pair")
    p.add_argument("--bytes", type=int_arg, default=16 << 20, help="largest payload in bytes")
    p.add_argument("--timeout", type=float_arg, default=60.0, help="bound on every wait (seconds)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--mps", default="auto", choices=["auto", "required", "off"])


def main(args: argparse.Namespace) -> int:
    from colocate.config import MpsSection
    from colocate.topology import close_topology, init_topology

    if args.slots < 1 or args.steps < 1 or args.bytes < 1:
        raise SystemExit("selftest: --slots, --steps and --bytes must be >= 1")
    topo = init_topology(device=args.device, timeout_s=max(args.timeout, 120.0),
                         mps=MpsSection(mode=args.mps))
    info = topo.info
    channel = open_pair_channel(engine=not topo.is_trainer, me=info.name,
                                peer_rank=info.peer_rank, peer_pid=topo.peer_pid,
                                job_token=topo.job_token, pair_index=info.pair_index,
                                timeout_s=args.timeout)
    failed = False
    try:
        if topo.is_trainer:
            ring = RingConsumer.start(channel, device=topo.device, needs=NEEDS,
                                      timeout_s=args.timeout)
            backend = ring.slots.backend
            report = consume(ring, steps=args.steps, max_bytes=args.bytes,
                             pair=info.pair_index, device=topo.device)
            reports = [None] * info.num_pairs
            dist.all_gather_object(reports, report, group=topo.role_cpu_group)
            if topo.is_first:
                print(format_reports(reports, slots=args.slots, backend=backend), flush=True)
                for r in reports:
                    for m in r.mismatches[:10]:
                        print("MISMATCH", m, file=sys.stderr, flush=True)
            failed = any(r.mismatches for r in reports)
        else:
            ring = RingProducer.start(channel, num_slots=args.slots,
                                      slot_bytes=slot_capacity(args.bytes), device=topo.device,
                                      name=f"colocate-{topo.job_token}-pair{info.pair_index}",
                                      timeout_s=args.timeout)
            produce(ring, steps=args.steps, max_bytes=args.bytes, pair=info.pair_index,
                    device=topo.device)
    except BaseException as e:
        channel.report_error(f"{info.name}: {type(e).__name__}: {e}")
        raise
    finally:
        channel.close()
    close_topology(topo, timeout_s=max(args.timeout, 60.0))
    return 1 if failed else 0
