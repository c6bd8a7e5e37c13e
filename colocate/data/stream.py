"""An engine's endless stream of packed micro-batches from its shard of the data.

The state is small (sampler epoch and cursor plus what identifies the stream), so it
rides in every checkpoint; loading it continues exactly where the saved run stopped.
"""

from __future__ import annotations

from colocate.data.errors import DataError
from colocate.data.packing import MicroBatch, pack_micro_batch
from colocate.data.sampler import ShardedSampler
from colocate.data.tokenized import TokenizedDataset


class SampledStream:
    """What every engine-side stream of micro-batches shares: its position is a sampler's
    (epoch, cursor), saved with what it is a position in (`key`: what the samples are, the
    seed, the sharding) and refused on load when that differs."""

    key: str
    sampler: ShardedSampler
    what = "the data stream"
    resume_fix = "Restore the original data, seed, GPU count and train.sp_size"
    """What to restore when a saved state does not match (after which: or start afresh)."""

    def _identity(self) -> dict:
        s = self.sampler
        return {"dataset_key": self.key, "seed": s.seed, "shuffle": s.shuffle,
                "shard_index": s.shard_index, "num_shards": s.num_shards}

    def state(self) -> dict:
        """Position plus what it is a position in (checked on load)."""
        return {**self.sampler.state(), **self._identity()}

    def load_state(self, state: dict) -> None:
        """Continue from ``state``. A state of a different stream (other data, seed or
        sharding) is refused: its position would silently mean different samples."""
        mismatched = [f"{k}: saved {state.get(k)!r}, now {v!r}"
                      for k, v in self._identity().items() if state.get(k) != v]
        if mismatched:
            raise DataError(f"cannot resume {self.what}: " + "; ".join(mismatched) +
                            f". {self.resume_fix}, or start a fresh run "
                            "(checkpoint.resume=never)")
        self.sampler.load_state(state)


class DataStream(SampledStream):
    def __init__(self, tokenized: TokenizedDataset, *, seed: int, shuffle: bool,
                 shard_index: int, num_shards: int, tokens_per_micro_step: int):
        longest = int(tokenized.lengths().max())
        assert longest <= tokens_per_micro_step, (
            f"a {longest}-token sequence exceeds the {tokens_per_micro_step}-token budget")
        self.tokenized = tokenized
        self.tokens_per_micro_step = tokens_per_micro_step
        self.sampler = ShardedSampler(tokenized.num_sequences, seed=seed, shuffle=shuffle,
                                      shard_index=shard_index, num_shards=num_shards)

    def next_micro_batch(self) -> MicroBatch:
        return pack_micro_batch(self.tokenized, self.sampler, self.tokens_per_micro_step)

    @property
    def key(self) -> str:
        """What the stream's samples are (the tokenized data's key): trainers compare it."""
        return self.tokenized.key

    def decode_meta(self) -> dict:
        """Nothing is decoded here (online decode's stream reports its answering)."""
        return {}

    def close(self) -> None:
        pass
