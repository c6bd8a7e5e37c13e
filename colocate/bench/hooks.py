"""The benchmark modes as hooks into the production loops, so the loops hold no bench branches.

`bench train`'s "engine alone" and "trainer alone" rows run the real colocated job with one
side reduced to a stub that costs nothing:

* `bench.engine=replay` (the trainer alone): the engine prefills its first
  `bench.replay_micro_steps` micro-steps for real, keeps copies, and from then on re-sends
  those copies without reading data or running the target.
* `bench.trainer=discard` (the engine alone): the trainer releases every micro-step unread
  and skips the optimizer, reporting zero statistics.

A normal run gets `Prefill` and the trainer's own work: every micro-step is real.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch

from colocate.config import BenchSection
from colocate.metrics import stats_length

Pack = Callable[[], Iterable[tuple[object, dict]]]


class EngineFeed(Protocol):
    def step_batches(self, pack: Pack, micro_steps: int) -> Iterable[tuple[object, dict]]:
        """One optimizer step's (batch, meta) pairs; a None batch means `replay_into`."""

    def after_prefill(self, writer) -> None:
        """Called with each slot the engine prefilled, before it is published."""

    def replay_into(self, writer) -> None:
        """Fill a slot without the target (only after `step_batches` yielded a None batch)."""


class Prefill:
    """A run: every micro-step packed from the data and prefilled by the target."""

    def step_batches(self, pack: Pack, micro_steps: int) -> Iterable[tuple[object, dict]]:
        return pack()

    def after_prefill(self, writer) -> None:
        pass

    def replay_into(self, writer) -> None:
        raise AssertionError("a run never replays")


class Replay:
    """bench.engine=replay: capture the first `capacity` prefilled micro-steps, then resend
    them in turn."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.captured: list[tuple[dict, dict]] = []
        self.replayed = 0

    @property
    def replaying(self) -> bool:
        return len(self.captured) == self.capacity

    def step_batches(self, pack: Pack, micro_steps: int) -> Iterable[tuple[object, dict]]:
        return [(None, {})] * micro_steps if self.replaying else pack()

    def after_prefill(self, writer) -> None:
        # Held-out micro-steps are not training ones: never replay them as such.
        if not self.replaying and writer.meta.get("split") != "val":
            self.captured.append(({k: v.clone() for k, v in writer.views().items()},
                                  dict(writer.meta)))

    def replay_into(self, writer) -> None:
        tensors, meta = self.captured[self.replayed % len(self.captured)]
        for name, tensor in tensors.items():
            writer.put(name, tensor)
        writer.meta.update(meta)
        self.replayed += 1


def engine_feed(bench: BenchSection) -> EngineFeed:
    return Replay(bench.replay_micro_steps) if bench.engine == "replay" else Prefill()


class TrainerWork(Protocol):
    def learn(self, delivery, micro: int, last: bool) -> torch.Tensor:
        """Forward and backward of one delivered micro-step; its stats vector."""

    def optimizer_step(self, step: int) -> torch.Tensor:
        """Clip and step; the gradient norm (a device scalar)."""


class Discard:
    """bench.trainer=discard: every micro-step released unread, no optimizer step."""

    def __init__(self, num_positions: int, device: torch.device):
        self.num_positions, self.device = num_positions, device

    def learn(self, delivery, micro: int, last: bool) -> torch.Tensor:
        return torch.zeros(stats_length(self.num_positions), dtype=torch.float64,
                           device=self.device)

    def optimizer_step(self, step: int) -> torch.Tensor:
        return torch.zeros((), device=self.device)


def trainer_work(bench: BenchSection, real: TrainerWork, num_positions: int,
                 device: torch.device) -> TrainerWork:
    return Discard(num_positions, device) if bench.trainer == "discard" else real
