"""The hf engine writing through a real ring: an engine process and a trainer process
(shared-memory slots, the pair channel), the trainer requiring `feature_needs`."""

from __future__ import annotations

import os

import torch

from colocate.engine.hf import HFTargetEngine
from colocate.transport import RingConsumer, RingProducer
from colocate.transport.local_pair import run_local_pair
from tests.unit.test_engine_base import feature_needs, make_batch, read_slot, slot_writer

BUDGET = 32
# Three micro-steps through two slots, so a slot is reused after its ack.
BATCHES = [([9, 1, 14], 0), ([32], 1), ([5, 5, 5, 5], 2)]


def _pair(ctx, path: str, hidden_size: int, num_aux: int):
    """Both sides return what they saw in the slots: the engine before publishing (the slot
    is still its own then), the trainer on receipt."""
    if ctx.engine:
        engine = HFTargetEngine(path, dtype=torch.float32, device=ctx.device)
        ring = RingProducer.start(ctx.channel, num_slots=2,
                                  slot_bytes=engine.slot_bytes(BUDGET, BUDGET), device=ctx.device,
                                  name=f"colocate-test-{os.getpid()}", timeout_s=ctx.timeout_s)
        written = []
        for seq_lens, seed in BATCHES:
            writer = ring.acquire()
            engine.prefill(make_batch(seq_lens, engine.vocab_size, seed), writer, budget=BUDGET)
            end = writer.specs[-1].offset + writer.specs[-1].nbytes
            written.append(ring.slots.buffers[writer.slot][:end].numpy().copy())
            ring.publish(writer)
        ring.close()
        return written
    ring = RingConsumer.start(ctx.channel, device=ctx.device, timeout_s=ctx.timeout_s,
                              needs=feature_needs(hidden_size, num_aux, torch.float32))
    received = []
    while (delivery := ring.receive()) is not None:
        # numpy: pickled by value (a torch tensor would be shared through the dying child)
        received.append(({k: v.numpy().copy() for k, v in delivery.tensors.items()},
                         dict(delivery.meta), delivery.slot,
                         ring.slots.buffers[delivery.slot].numpy().copy()))
        delivery.release()
    ring.close()
    return received


def test_trainer_receives_what_the_engine_computed(tiny_assets):
    path = tiny_assets["target_llama"]
    local = HFTargetEngine(path, dtype=torch.float32, device=torch.device("cpu"))
    engine_result, trainer_result = run_local_pair(
        _pair, kwargs={"path": path, "hidden_size": local.hidden_size, "num_aux": local.num_aux},
        timeout_s=60, wall_s=120)
    assert engine_result.ok and trainer_result.ok, (engine_result, trainer_result)

    received = trainer_result.value
    assert [slot for _, _, slot, _ in received] == [0, 1, 0]
    for written, (_, _, _, slot_bytes) in zip(engine_result.value, received):
        assert (slot_bytes[:len(written)] == written).all()  # the transport is byte-exact
    for (seq_lens, seed), (tensors, meta, _, _) in zip(BATCHES, received):
        batch = make_batch(seq_lens, local.vocab_size, seed)
        writer = slot_writer(local.slot_bytes(BUDGET, BUDGET))
        local.prefill(batch, writer, budget=BUDGET)
        expected = read_slot(writer)
        assert set(tensors) == set(expected)
        for name, want in expected.items():
            # Same weights and inputs; only the thread split of a CPU matmul may differ.
            torch.testing.assert_close(torch.from_numpy(tensors[name]), want, atol=1e-6,
                                       rtol=1e-6, msg=name)
        assert meta == {"num_tokens": sum(seq_lens), "num_sequences": len(seq_lens),
                        "aux_layer_ids": [1, 2, 2]}
