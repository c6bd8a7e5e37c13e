"""The engine packs an optimizer step's micro-batches up front: per-message data positions
and label counts, and the step's totals the trainer's loss divides by."""

import torch

from colocate.config import load_config
from colocate.draft import label_counts
from colocate.draft.recipe import recipe_for
from colocate.train.engine_loop import pack_step
from tests.unit.test_data_stream import _stream, _synthetic


def _eagle3(unroll_steps: int):
    return recipe_for(load_config(None, [f"draft.unroll_steps={unroll_steps}"]))


def _pack(stream, num_micro_steps, unroll_steps, step=0):
    return pack_step(stream, num_micro_steps, _eagle3(unroll_steps), seed=0, step=step, shard=0)


def test_pack_step_meta_matches_one_batch_at_a_time():
    data = _synthetic()
    packed, plain = _stream(data), _stream(data)
    for _ in range(2):  # two optimizer steps of three micro-steps
        step = _pack(packed, 3, 4)
        totals = torch.zeros(4, dtype=torch.int64)
        for batch, meta in step:
            want = plain.next_micro_batch()
            assert torch.equal(batch.input_ids, want.input_ids)
            assert meta["data_state"] == plain.state()  # the position right after this batch
            assert meta["seq_lens"] == want.seq_lens.tolist()
            counts = label_counts(want.seq_lens, want.loss_mask, 4)
            assert meta["label_counts"] == counts.tolist()
            totals += counts
        assert all(meta["step_label_counts"] == totals.tolist() for _, meta in step)
        assert totals[0] > totals[3] > 0


def test_resuming_from_a_message_continues_with_the_next_batch():
    data = _synthetic()
    stream = _stream(data)
    step = _pack(stream, 3, 2)
    resumed = _stream(data)
    resumed.load_state(step[0][1]["data_state"])
    assert torch.equal(resumed.next_micro_batch().input_ids, step[1][0].input_ids)
