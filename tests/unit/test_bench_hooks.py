"""The bench modes' hooks (colocate/bench/hooks.py) on a stand-in ring slot: replay captures
the first prefilled micro-steps and resends copies in turn; discard reports zeros."""

import torch

from colocate.bench.hooks import Discard, Prefill, Replay, engine_feed, trainer_work
from colocate.config import BenchSection
from colocate.metrics import stats_length


class Slot:
    """A ring slot's writer surface: tensors by name, and meta."""

    def __init__(self):
        self.tensors, self.meta = {}, {}

    def put(self, name, tensor):
        self.tensors[name] = tensor.clone()

    def views(self):
        return self.tensors


def test_replay_resends_copies_of_the_first_prefills_in_turn():
    feed = engine_feed(BenchSection(engine="replay", replay_micro_steps=2))
    packed = []

    def pack(step):
        return lambda: [(f"batch{step}.{i}", {"step": step}) for i in range(2)]

    sent = []
    for step in range(3):
        for batch, meta in feed.step_batches(pack(step), micro_steps=2):
            slot = Slot()
            if batch is None:
                feed.replay_into(slot)
            else:
                packed.append(batch)
                slot.meta.update(meta)
                slot.put("x", torch.tensor([len(packed)]))  # the prefill
                feed.after_prefill(slot)
                slot.tensors["x"] += 100  # the ring reuses the slot: the copy must not see it
            sent.append((slot.tensors["x"].item(), slot.meta["step"]))
    assert packed == ["batch0.0", "batch0.1"]  # data read for the captured micro-steps only
    assert sent == [(101, 0), (102, 0), (1, 0), (2, 0), (1, 0), (2, 0)]


def test_replay_never_captures_a_held_out_micro_step():
    feed = Replay(capacity=1)
    held_out, train = Slot(), Slot()
    held_out.meta["split"] = "val"
    held_out.put("x", torch.tensor([7]))
    feed.after_prefill(held_out)
    assert not feed.replaying
    train.put("x", torch.tensor([8]))
    feed.after_prefill(train)
    replayed = Slot()
    feed.replay_into(replayed)
    assert feed.replaying and replayed.tensors["x"].item() == 8


def test_a_run_prefills_every_micro_step_and_discard_reports_zeros():
    feed = engine_feed(BenchSection())
    assert isinstance(feed, Prefill)
    assert list(feed.step_batches(lambda: [("b", {})], 1)) == [("b", {})]
    real = object()
    assert trainer_work(BenchSection(), real, 7, torch.device("cpu")) is real
    work = trainer_work(BenchSection(trainer="discard"), real, 7, torch.device("cpu"))
    assert isinstance(work, Discard)
    stats = work.learn(None, 0, last=True)
    assert stats.shape == (stats_length(7),) and not stats.any()
    assert work.optimizer_step(0).item() == 0.0
    assert not isinstance(engine_feed(BenchSection(engine="replay")), Prefill)
    assert isinstance(engine_feed(BenchSection(engine="replay")), Replay)
