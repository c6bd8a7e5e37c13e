"""The pair session's protocol and timeout policy, between two real processes (the pair
channel and shared-memory ring slots, as on CPU under torchrun)."""

from __future__ import annotations

import os
import time

import torch

from colocate.train.pair_session import PairSession
from colocate.transport import PeerTimeout
from colocate.transport.layout import Need
from colocate.transport.local_pair import run_local_pair

# A steady bound of 2 s leaves the trainer time to receive and declare its pause on a
# loaded machine; the pauses below outlast it.
STARTUP_S, STEADY_S = 20.0, 2.0


class _Collectives:
    """Stands in for the topology's role-pure groups, which a two-process pair without
    torchrun does not have: records each bound the session sets."""

    def __init__(self):
        self.bounds = []

    def bound_collectives(self, timeout_s: float) -> bool:
        self.bounds.append(timeout_s)
        return True


def _pair(ctx, pause_s: float, declare: bool):
    topo = _Collectives()
    session = PairSession(ctx.channel, topo, startup_s=STARTUP_S, steady_s=STEADY_S)
    if ctx.engine:
        session.send_plan(vocab=[1, 2, 3])
        start = session.receive_start()
        ring = session.open_producer(num_slots=1, slot_bytes=1024, device=ctx.device,
                                     name=f"colocate-test-{os.getpid()}")
        for step in range(start["start_step"], 3):
            writer = ring.acquire()  # after the first: waits for the trainer's ack
            writer.put("x", torch.full((4,), float(step)))
            ring.publish(writer)
            if step == 1:
                session.enter_steady_state()
        ring.close()
        return {"start": start, "bounds": topo.bounds, "ring_timeout": ring.timeout_s}
    plan = session.receive_plan()
    session.send_start(start_step=1, data_state={"line": 7})
    ring = session.open_consumer(device=ctx.device, needs={"x": Need(torch.float32, (4,))})
    seen = []
    while (delivery := ring.receive()) is not None:
        with delivery:
            seen.append(delivery.tensors["x"][0].item())
            session.enter_steady_state()
            if len(seen) == 1:  # a checkpoint that outlasts run.timeout_s
                if declare:
                    with session.long_pause("checkpoint at step 2"):
                        time.sleep(pause_s)
                else:
                    time.sleep(pause_s)
    ring.close()
    return {"plan": plan, "seen": seen, "bounds": topo.bounds}


def test_plan_start_steady_state_and_a_declared_pause():
    engine, trainer = run_local_pair(_pair, kwargs={"pause_s": 3 * STEADY_S, "declare": True},
                                     timeout_s=STARTUP_S, wall_s=60)
    assert engine.ok and trainer.ok, (engine, trainer)
    assert trainer.value["plan"] == {"vocab": [1, 2, 3]}
    assert engine.value["start"] == {"start_step": 1, "data_state": {"line": 7}}
    assert trainer.value["seen"] == [1.0, 2.0]
    # Steady state once; the pause relaxed the trainers' collectives and tightened them again.
    assert trainer.value["bounds"] == [STEADY_S, STARTUP_S, STEADY_S]
    assert engine.value["bounds"] == [STEADY_S] and engine.value["ring_timeout"] == STEADY_S


def test_an_undeclared_pause_past_the_steady_timeout_fails_the_engine_naming_the_trainer():
    engine, trainer = run_local_pair(_pair, kwargs={"pause_s": 4 * STEADY_S, "declare": False},
                                     timeout_s=STARTUP_S, wall_s=60)
    assert not engine.ok
    assert PeerTimeout.__name__ in engine.error and "trainer rank 0" in engine.error, engine.error
