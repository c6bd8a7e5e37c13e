"""`train.epochs`: how many optimizer steps E passes over the training data take.

The step count is a pure function of the shared data, so every process can agree on it:
each engine replays its shard's sampler order (data/sampler.py) through the greedy packer's
rule (data/packing.py: a micro-batch takes whole sequences in order until the next one would
pass the token budget; the stream runs on across epoch boundaries) and counts the
micro-batches up to the one that holds the last sequence of epoch E - 1. Pairs' shards pack
into different counts; the run takes the busiest pair's, so every pair sees each of its
sequences at least E times (the others start their next epoch for the remaining steps):

    total steps = ceil(max over pairs of micro-batches(E) / train.micro_steps)

The engines gather their counts over the engine group (gloo, CPU) and send the total to
their trainers in the plan; a resumed run counts the same. The counting replays indices and
lengths only (no tokens), one pass per epoch over the shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from colocate.data.sampler import ShardedSampler


def micro_batches_per_epoch(lengths: list[int], sampler: ShardedSampler,
                            tokens_per_micro_step: int, epochs: int) -> list[int]:
    """Micro-batches packed from the start of `sampler`'s stream through the end of each
    epoch 0..epochs-1 (cumulative counts): the packer's rule, replayed on `lengths`."""
    counts, count, used = [], 0, 0  # used: tokens in the micro-batch still open
    for epoch in range(epochs):
        for index in sampler.epoch_order(epoch).tolist():
            length = lengths[index]
            if used and used + length > tokens_per_micro_step:
                count, used = count + 1, 0
            used += length
        counts.append(count + (1 if used else 0))  # the open one holds the epoch's last
    return counts


@dataclass(frozen=True)
class EpochPlan:
    epochs: int
    micro_steps: int
    pair_micro_batches: list[int]
    """Per pair: micro-batches packed from its shard for all the epochs."""
    first_epoch_micro_batches: list[int]
    """Per pair: those of the first epoch alone."""

    @property
    def total_steps(self) -> int:
        return math.ceil(max(self.pair_micro_batches) / self.micro_steps)

    def describe(self) -> str:
        """The start-up line: steps per epoch and in all, and where they come from."""
        num_pairs = len(self.pair_micro_batches)
        per_epoch = math.ceil(max(self.first_epoch_micro_batches) / self.micro_steps)
        return (f"train.epochs={self.epochs}: {self.total_steps} optimizer steps "
                f"({per_epoch} per epoch; the busiest of {num_pairs} pair(s) packs "
                f"{max(self.pair_micro_batches)} micro-batches in {self.epochs} epoch(s), "
                f"{self.micro_steps} per step)")


def plan_epochs(lengths: list[int], sampler: ShardedSampler, *, tokens_per_micro_step: int,
                epochs: int, micro_steps: int, engine_group) -> EpochPlan:
    """Count this engine's shard and gather every engine's counts (`engine_group`: the
    engines' gloo group; a collective every engine enters, trainers never)."""
    mine = micro_batches_per_epoch(lengths, sampler, tokens_per_micro_step, epochs)
    gathered: list = [None] * dist.get_world_size(engine_group)
    dist.all_gather_object(gathered, mine, group=engine_group)
    return EpochPlan(epochs=epochs, micro_steps=micro_steps,
                     pair_micro_batches=[counts[-1] for counts in gathered],
                     first_epoch_micro_batches=[counts[0] for counts in gathered])
