"""Pack whole sequences into one micro-step of at most a token budget.

Sequences are never split: a draft trained on half a reply learns from a context the
target never saw. Greedy in sampler order (no look-ahead reordering), so packing is as
deterministic as the sampler and a resumed stream repacks identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.data.sampler import ShardedSampler
from colocate.data.tokenized import TokenizedDataset


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor
    """int64 [T]: the packed sequences back to back (T <= the micro-step budget)."""
    positions: torch.Tensor
    """int64 [T]: position within its own sequence (0 at each start), which is also how
    varlen attention finds the boundaries."""
    loss_mask: torch.Tensor
    """bool [T]: trainable tokens (assistant content and its end-of-turn marker)."""
    seq_lens: torch.Tensor
    """int32 [S]: lengths of the packed sequences; sums to T."""
    indices: torch.Tensor
    """int64 [S]: dataset index of each packed sequence (for debugging and tests)."""
    epoch: int
    """Sampler epoch of the first sequence."""
    start_state: dict
    """Sampler state before this micro-batch was taken."""
    end_state: dict
    """Sampler state after it: resuming here yields the next micro-batch."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def pack_micro_batch(dataset: TokenizedDataset, sampler: ShardedSampler,
                     tokens_per_micro_step: int) -> MicroBatch:
    """Take sequences in sampler order until the next one would exceed the budget."""
    start_state = sampler.state()
    lengths = dataset.lengths()
    picked: list[int] = []
    used = 0
    while True:
        index = sampler.peek()
        length = int(lengths[index])
        assert length <= tokens_per_micro_step, (
            f"sequence {index} has {length} tokens, over the micro-step budget "
            f"{tokens_per_micro_step}; data.max_length must not exceed it")
        if picked and used + length > tokens_per_micro_step:
            break
        picked.append(sampler.advance())
        used += length
    return _micro_batch(dataset, picked, start_state, sampler.state())


def pack_once(dataset: TokenizedDataset, indices: list[int],
              tokens_per_micro_step: int) -> list[MicroBatch]:
    """Every sequence of `indices` exactly once, in order, greedily packed into micro-batches
    of at most the budget (a validation pass; the states are not resumable positions)."""
    lengths = dataset.lengths()
    batches, picked, used = [], [], 0
    for index in indices:
        length = int(lengths[index])
        assert length <= tokens_per_micro_step, (index, length, tokens_per_micro_step)
        if picked and used + length > tokens_per_micro_step:
            batches.append(_micro_batch(dataset, picked, {}, {}))
            picked, used = [], 0
        picked.append(index)
        used += length
    if picked:
        batches.append(_micro_batch(dataset, picked, {}, {}))
    return batches


def _micro_batch(dataset: TokenizedDataset, picked: list[int], start_state: dict,
                 end_state: dict) -> MicroBatch:
    return micro_batch_from([dataset.sequence(i) for i in picked], picked, start_state,
                            end_state)


def micro_batch_from(sequences: list[tuple], indices: list[int], start_state: dict,
                     end_state: dict) -> MicroBatch:
    """A micro-batch of `sequences` ((ids, loss mask) pairs, tensors or lists), back to back;
    `indices`: where each came from (dataset or prompt index)."""
    ids = [torch.as_tensor(i, dtype=torch.int64) for i, _ in sequences]
    masks = [torch.as_tensor(m, dtype=torch.bool) for _, m in sequences]
    seq_lens = torch.tensor([t.numel() for t in ids], dtype=torch.int32)
    return MicroBatch(input_ids=torch.cat(ids), positions=positions_from_lens(seq_lens),
                      loss_mask=torch.cat(masks), seq_lens=seq_lens,
                      indices=torch.tensor(indices, dtype=torch.int64),
                      epoch=start_state.get("epoch", 0), start_state=start_state,
                      end_state=end_state)


def positions_from_lens(seq_lens: torch.Tensor) -> torch.Tensor:
    """int64 [sum(seq_lens)]: 0..len-1 for each packed sequence, on seq_lens' device."""
    lens = seq_lens.to(torch.int64)
    starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return torch.arange(int(lens.sum()), dtype=torch.int64, device=lens.device) - starts
