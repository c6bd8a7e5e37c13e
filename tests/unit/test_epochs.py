"""train.epochs: the step count from the packed data (colocate/train/epochs.py) against the
real packer, the config rules of max_steps / epochs, and a finished epochs run on rerun."""

import json
import random

import pytest
import torch

from colocate.config import ConfigError, load_config
from colocate.data.stream import DataStream
from colocate.data.tokenized import TokenizedDataset
from colocate.train.epochs import EpochPlan, micro_batches_per_epoch
from colocate.train.run_dir import finished_message


def dataset(lengths: list[int]) -> TokenizedDataset:
    offsets = torch.tensor([0] + lengths).cumsum(0)
    total = int(offsets[-1])
    return TokenizedDataset(ids=torch.zeros(total, dtype=torch.int32),
                            loss_mask=torch.ones(total, dtype=torch.bool), offsets=offsets,
                            key="fake", stats=None)


def packed_until(stream: DataStream, epochs: int) -> list[int]:
    """Micro-batches the real packer cuts until the stream is past each epoch: the ones
    that start inside epochs 0..e, counted by packing them."""
    counts, count = [], 0
    for epoch in range(epochs):
        while stream.state()["epoch"] <= epoch:
            stream.next_micro_batch()
            count += 1
        counts.append(count)
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_counts_match_the_packer(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 100, 256])
    lengths = [rng.randint(1, budget) for _ in range(rng.randint(8, 60))]
    num_shards, shuffle = rng.choice([1, 2, 3]), rng.choice([True, False])
    for shard in range(num_shards):
        def stream():
            return DataStream(dataset(lengths), seed=seed, shuffle=shuffle, shard_index=shard,
                              num_shards=num_shards, tokens_per_micro_step=budget)
        got = micro_batches_per_epoch(lengths, stream().sampler, budget, 3)
        assert got == packed_until(stream(), 3)


def test_by_hand():
    # Budget 9, no shuffle, one shard: epoch 0 packs [6] [6 3] [4]; 4 + 6 > 9, so epoch 1
    # starts a fresh micro-batch and packs the same three: 6 in all.
    lengths = [6, 6, 3, 4]
    stream = DataStream(dataset(lengths), seed=0, shuffle=False, shard_index=0, num_shards=1,
                        tokens_per_micro_step=10)
    assert micro_batches_per_epoch(lengths, stream.sampler, 9, 2) == [3, 6]
    # Budget 10: epoch 0's last micro-batch [4] also takes epoch 1's first 6 ([4 6]), then
    # [6 3] [4]: 5 in all, epoch 0 ending inside the third.
    assert micro_batches_per_epoch(lengths, stream.sampler, 10, 2) == [3, 5]
    # Two pairs (6 and 5 micro-batches), 2 micro-steps per optimizer step: 3 steps.
    plan = EpochPlan(epochs=2, micro_steps=2, pair_micro_batches=[6, 5],
                     first_epoch_micro_batches=[3, 3])
    assert plan.total_steps == 3
    assert plan.describe() == ("train.epochs=2: 3 optimizer steps (2 per epoch; the busiest of "
                               "2 pair(s) packs 6 micro-batches in 2 epoch(s), 2 per step)")


def test_exactly_one_of_max_steps_and_epochs():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_steps=10", "train.epochs=2"])
    assert str(e.value) == ("train.max_steps: 10 and train.epochs 2 are both set; set one of "
                            "them (the other to 0)")
    with pytest.raises(ConfigError, match="train.stop_at_step: got 50; use 0 "):
        load_config(None, ["train.max_steps=10", "train.stop_at_step=50"])
    with pytest.raises(ConfigError) as e:
        load_config(None, []).check_training()
    assert str(e.value) == ("train.max_steps: neither it nor train.epochs is set; set one of "
                            "them, e.g. train.max_steps=1000 or train.epochs=2")
    cfg = load_config(None, ["train.epochs=2", "train.stop_at_step=5"])
    cfg.check_training()
    cfg.train.resolve_epochs(12)
    assert cfg.train.total_steps == 12 and cfg.last_step == 5
    assert "epochs" in cfg.to_dict()["train"] and cfg.to_dict()["train"]["max_steps"] == 0
    with pytest.raises(ConfigError, match=r"train.stop_at_step: 5 is past the end: "
                                          r"train.epochs=2 is 4 steps on this data; use 0 "
                                          r"\(run to the end\) or 1..4"):
        cfg.train.resolve_epochs(4)


def test_a_finished_epochs_run_says_so(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000012"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 12, "epochs": 2, "total_steps": 12}))
    done = finished_message(load_config(None, [f"run.dir={run}", "train.epochs=2"]))
    assert done.startswith(f"{run}: already at step 12 (train.epochs=2, 12 steps); nothing to "
                           "train")
    assert "To train further raise train.epochs" in done
    # More epochs than the checkpoint's run: the step count is not known before the data.
    assert finished_message(load_config(None, [f"run.dir={run}", "train.epochs=3"])) is None
