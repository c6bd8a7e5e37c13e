"""Engine/trainer functions run by tests through `run_local_pair` (spawned processes)."""

import os
import signal
import time

import torch

from colocate.selftest import NEEDS, consume, produce, slot_capacity
from colocate.transport import Need, RingConsumer, RingProducer

MAX_BYTES = 200_000


def _producer(ctx, slots, max_bytes=MAX_BYTES):
    return RingProducer.start(ctx.channel, num_slots=slots, slot_bytes=slot_capacity(max_bytes),
                              device=ctx.device, name=f"colocate-test-{os.getpid()}",
                              timeout_s=ctx.timeout_s)


def _consumer(ctx, needs=NEEDS):
    return RingConsumer.start(ctx.channel, device=ctx.device, needs=needs, timeout_s=ctx.timeout_s)


def roundtrip(ctx, slots, steps):
    """Deterministic payloads of varying size; the trainer checks every byte."""
    if ctx.engine:
        produce(_producer(ctx, slots), steps=steps, max_bytes=MAX_BYTES, pair=0, device=ctx.device)
        return None
    report = consume(_consumer(ctx), steps=steps, max_bytes=MAX_BYTES, pair=0, device=ctx.device)
    return {"steps": report.steps, "mismatches": report.mismatches}


def slow_trainer(ctx, slots, steps, hold_s):
    """The trainer holds each slot for a while and re-checks it after the hold: if the engine
    overwrote a held slot the check fails. Both sides log when they got/gave back slots."""
    if ctx.engine:
        ring = _producer(ctx, slots)
        acquired_ns, max_in_flight = [], 0
        for step in range(steps):
            w = ring.acquire()
            acquired_ns.append(time.monotonic_ns())
            w.put("header", torch.tensor([step, 0, 1]))
            w.put("payload", torch.full((1000,), step % 256, dtype=torch.uint8))
            w.put("values", torch.full((2, 4), float(step)))
            ring.publish(w)
            max_in_flight = max(max_in_flight, len(ring._in_flight))
        ring.close()
        return {"acquired_ns": acquired_ns, "max_in_flight": max_in_flight,
                "wait_s": ring.stats.wait_s}
    ring = _consumer(ctx)
    released_ns, corrupt = [], []
    while (d := ring.receive()) is not None:
        time.sleep(hold_s)
        payload = d.tensors["payload"]
        if not torch.equal(payload, torch.full((1000,), d.step % 256, dtype=torch.uint8,
                                               device=payload.device)):
            corrupt.append(d.step)
        released_ns.append(time.monotonic_ns())  # stamped before the ack can leave
        d.release()
    ring.close()
    return {"released_ns": released_ns, "corrupt": corrupt}


def wrong_layout(ctx):
    """The engine sends 'values' as int32 and omits nothing else; the trainer needs float32."""
    if ctx.engine:
        ring = _producer(ctx, 2)
        w = ring.acquire()
        w.put("header", torch.tensor([0, 0, 4]))
        w.put("payload", torch.zeros(4, dtype=torch.uint8))
        w.put("values", torch.zeros(1, 4, dtype=torch.int32))
        ring.publish(w)
        ring.close()  # waits for the ack, so it sees the trainer's error
        return None
    ring = _consumer(ctx)
    ring.receive()
    return None


def stop_after(ctx, who, steps_before, sig):
    """`who` signals itself after `steps_before` messages (SIGKILL: dies; SIGSTOP: stays
    alive but never answers); the other side keeps going and must notice."""
    if ctx.engine:
        ring = _producer(ctx, 2)
        for step in range(100):
            if who == "engine" and step == steps_before:
                os.kill(os.getpid(), sig)
            w = ring.acquire()
            w.put("header", torch.tensor([step, 0, 1]))
            w.put("payload", torch.zeros(1, dtype=torch.uint8))
            w.put("values", torch.zeros(1, 4))
            ring.publish(w)
        ring.close()
        return None
    ring = _consumer(ctx)
    n = 0
    while (d := ring.receive()) is not None:
        if who == "trainer" and n == steps_before:
            os.kill(os.getpid(), sig)
        d.release()
        n += 1
    ring.close()
    return n


def die_after(ctx, who, steps_before):
    return stop_after(ctx, who, steps_before, signal.SIGKILL)


def freeze_after(ctx, who, steps_before):
    return stop_after(ctx, who, steps_before, signal.SIGSTOP)


def overflow(ctx):
    """The engine tries to write more than a slot holds."""
    if ctx.engine:
        ring = _producer(ctx, 2, max_bytes=1000)
        w = ring.acquire()
        w.alloc("payload", (ring.slot_bytes + 1,), torch.uint8)
        return None
    ring = _consumer(ctx, needs={"payload": Need(torch.uint8, (None,))})
    ring.receive()
    return None


def out_of_bounds(ctx):
    """A (buggy) engine describes a tensor past the end of its slot."""
    from colocate.transport.layout import TensorSpec

    if ctx.engine:
        ring = _producer(ctx, 2, max_bytes=1000)
        ring.channel.send("data", slot=0, step=0, meta={}, t_publish_ns=0,
                          layout=[TensorSpec("payload", "uint8", (ring.slot_bytes,), 256)])
        ring.channel.recv("ack", ctx.timeout_s, "an ack that must not come")
        return None
    ring = _consumer(ctx, needs={"payload": Need(torch.uint8, (None,))})
    ring.receive()
    return None
