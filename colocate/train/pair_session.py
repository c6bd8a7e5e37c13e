"""One trainer/engine pair's session: the messages of a training run, in order, and the one
timeout policy every wait of the run follows.

Messages (over the pair channel, `colocate/transport/channel.py`)::

    engine  -> trainer   plan    the draft vocabulary and what the engine found in the data
    trainer -> engine    start   the step and data position to begin at (a resume's)
    ring.py              hello, hello_ack, then data / ack per micro-step, pause (a declared
                         long pause), stop (an early, clean end), end, bye

Timeouts, one policy for the pair channel, the ring and the role-pure collectives:

* start-up: `run.startup_timeout_s` (loading the target, compiling, the first step);
* steady state, from the end of the first optimizer step: `run.timeout_s`, so a lost peer
  ends the job in seconds to minutes, not after start-up's long bound;
* a declared long pause (checkpoint, export): the trainer announces it on the ring with
  start-up's bound, which the engine's next wait honours, and the trainers' collectives
  get that bound until the pause is over.
"""

from __future__ import annotations

import contextlib

import torch

from colocate.topology import Topology
from colocate.transport import PairChannel, RingConsumer, RingProducer
from colocate.transport.layout import Need


class PairSession:
    def __init__(self, channel: PairChannel, topo: Topology, *, startup_s: float,
                 steady_s: float):
        self.channel, self.topo = channel, topo
        self.startup_s, self.steady_s = startup_s, steady_s
        self.ring: RingProducer | RingConsumer | None = None
        self._in_steady_state = False  # past the first optimizer step
        self._collectives_bounded = False  # False where this torch cannot rebound them

    # ---------------------------------------------------------------- start-up: engine
    def send_plan(self, **plan) -> None:
        self.channel.send("plan", **plan)

    def receive_start(self) -> dict:
        _, start = self.channel.recv("start", self.startup_s,
                                     "the trainer's start (step and data position)")
        return start

    def open_producer(self, *, num_slots: int, slot_bytes: int, device: torch.device,
                      name: str) -> RingProducer:
        self.ring = RingProducer.start(self.channel, num_slots=num_slots, slot_bytes=slot_bytes,
                                       device=device, name=name, timeout_s=self.startup_s)
        return self.ring

    # ---------------------------------------------------------------- start-up: trainer
    def receive_plan(self) -> dict:
        _, plan = self.channel.recv("plan", self.startup_s,
                                    "the engine's plan (data and draft vocabulary)")
        return plan

    def send_start(self, *, start_step: int, data_state) -> None:
        self.channel.send("start", start_step=start_step, data_state=data_state)

    def open_consumer(self, *, device: torch.device, needs: dict[str, Need]) -> RingConsumer:
        self.ring = RingConsumer.start(self.channel, device=device, needs=needs,
                                       timeout_s=self.startup_s)
        return self.ring

    # ---------------------------------------------------------------- the policy
    def enter_steady_state(self) -> None:
        """The first optimizer step is done (each side sees it its own way): tighten every
        wait to run.timeout_s."""
        if self._in_steady_state:
            return
        self._in_steady_state = True
        self.ring.timeout_s = self.steady_s
        self._collectives_bounded = self.topo.bound_collectives(self.steady_s)

    @contextlib.contextmanager
    def long_pause(self, what: str):
        """Trainer: work that may outlast run.timeout_s (storage, gathering the whole draft).
        The engine is told before it starts; the trainers' collectives wait as long."""
        self.ring.pause(what, self.startup_s)
        if self._collectives_bounded:
            self.topo.bound_collectives(self.startup_s)
        try:
            yield
        finally:
            if self._collectives_bounded:
                self.topo.bound_collectives(self.steady_s)

    def report_error(self, text: str) -> None:
        """Tell the peer why this side is failing (it raises our reason, not "peer died")."""
        self.channel.report_error(text)

    @property
    def rank_name(self) -> str:
        """This side's name in messages, e.g. "trainer rank 0"."""
        return self.channel.me
