"""Deterministic, sharded, endless order over sequence indices.

The order of epoch e is a pure function of (seed, e): a ``torch.Generator`` permutation
(or the identity without shuffling). Shard i of n takes every n-th index of it, so shards
are disjoint and together cover every sequence each epoch. The whole position is
(epoch, cursor), which is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import hashlib

import torch

from colocate.data.errors import DataError


def epoch_generator_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch); nearby seeds give unrelated orders."""
    digest = hashlib.sha256(f"colocate-sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ShardedSampler:
    def __init__(self, num_items: int, *, seed: int, shuffle: bool, shard_index: int,
                 num_shards: int):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
        if num_items < num_shards:
            raise DataError(f"{num_items} sequences cannot be split over {num_shards} shards "
                            "(one per engine): some would be empty; use more data or fewer "
                            "engines")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.shard_index, self.num_shards = shard_index, num_shards
        self.shard_len = len(range(shard_index, num_items, num_shards))
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """int64 [shard_len]: this shard's indices for ``epoch``, in visiting order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_generator_seed(self.seed, epoch))
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        return order[self.shard_index::self.num_shards].clone()

    def _current(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        return self._order

    def peek(self) -> int:
        """The next index, without moving."""
        return int(self._current()[self.cursor])

    def advance(self) -> int:
        """The next index; moves past it, into the next epoch after the shard's last."""
        index = self.peek()
        self.cursor += 1
        if self.cursor == self.shard_len:
            self.epoch, self.cursor = self.epoch + 1, 0
        return index

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict[str, int]) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.shard_len:
            raise DataError(f"sampler state {state} is outside this shard of {self.shard_len} "
                            "sequences; the data changed since the checkpoint")
        self.epoch, self.cursor = epoch, cursor
