"""DFlash training blocks on packed sequences: anchors, the attention mask, labels, weights.

Conventions (T tokens of S sequences packed back to back; `seq_lens` on the host):

    anchors      [S, N] int64 offsets *within* each sequence, sorted, padded with -1. A valid
                 anchor p has loss_mask[p] and loss_mask[p + 1] with p + 1 inside the sequence
                 (its first prediction is a trained token).
    block j      the anchor's block, j = s * N + n (padded anchors keep their slot so shapes
                 stay static). Token 0 = x[a_j] (the token serving seeds the block with: the
                 bonus token of the last verify), tokens 1..B-1 = mask_token_id. RoPE
                 positions positions[a_j] + 0 .. B-1. Queries are ordered m = j * B + k.
    keys         [context (T, packed index t); block tokens (M = S * N * B, index T + m)].
    mask         query (j, k) sees context key t iff t is in j's sequence and t < a_j (strict:
                 serving has target features of the committed prefix only; x[a_j] itself is
                 the unverified bonus token), and every token of block j (bidirectional:
                 sglang runs the draft with AttentionType.ENCODER_ONLY). A padded anchor's
                 queries see nothing (their attention output is 0).
    labels       block position k (1..B-1) predicts x[a_j + k] with weight
                 loss_mask[a_j + k] * exp(-(k - 1) / gamma); 0 when a_j + k leaves the
                 sequence or the anchor is padding. "Counted" = weight > 0.

Sequence parallelism (colocate/sequence_parallel.py): a trainer holds rows [start, end) of
the micro-batch (input_ids and loss_mask with a halo of B - 1 rows past `end`: the labels of
a block anchored at end - 1). `BlockLayout.build(..., chunk=(start, end))` keeps the blocks
anchored in the chunk and reads those rows; the context keys stay the whole micro-batch's
(the draft gathers them from the group), so the mask above is unchanged.

Everything except `draw_anchors` (host, CPU generator) runs on the device without host
synchronisation; `seq_lens` and the anchors stay on the host (the per-block tables are
built there) and go to the device once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from colocate.draft.flex import FLEX_IMPORT_ERROR
from colocate.hostcopy import to_device

if FLEX_IMPORT_ERROR is None:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def _lens(seq_lens: torch.Tensor | Sequence[int]) -> list[int]:
    """Host-side lengths (pass a CPU tensor or list: `.tolist()` on CUDA would sync)."""
    return [int(n) for n in (seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]


def draw_anchors(loss_mask: torch.Tensor, seq_lens: torch.Tensor | Sequence[int],
                 num_anchors: int,
                 generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """[S, num_anchors] int64 (CPU) anchors, valid ones first and sorted, padded with -1.

    Up to `num_anchors` valid positions per sequence, drawn without replacement (all of them
    when there are fewer). generator: one CPU generator for all sequences, drawn from in
    sequence order, or one per sequence (seeded from (seed, step, sample) by the caller, so
    a sample's anchors do not depend on how it was packed). Host side: the engine draws
    anchors while packing.
    """
    lens = _lens(seq_lens)
    mask_T = loss_mask.detach().bool().cpu()
    assert mask_T.numel() == sum(lens), (mask_T.numel(), lens)
    gens = [generator] * len(lens) if isinstance(generator, torch.Generator) else list(generator)
    assert len(gens) == len(lens), f"{len(gens)} generators for {len(lens)} sequences"
    anchors = torch.full((len(lens), num_anchors), -1, dtype=torch.long)
    start = 0
    for s, (length, gen) in enumerate(zip(lens, gens)):
        m = mask_T[start:start + length]
        start += length
        valid = (m[:-1] & m[1:]).nonzero().flatten()  # p and p + 1 both inside and trained
        if valid.numel() > num_anchors:
            pick = torch.randperm(valid.numel(), generator=gen)[:num_anchors]
            valid = valid[pick].sort().values
        anchors[s, :valid.numel()] = valid
    return anchors


@dataclass
class BlockLayout:
    """Per-block and per-key lookup tables of one packed micro-step (module docstring).

    The mask is expressed through small int32 tables rather than Python ints so that a
    compiled flex kernel takes them as inputs instead of guarding (and recompiling) on them.
    """

    block_size: int
    num_ctx: int
    """T, the packed context tokens."""
    anchor: torch.Tensor
    """[NB] int64 packed index of each block's anchor (its sequence's start when padded)."""
    valid: torch.Tensor
    """[NB] bool: the anchor is real, not padding."""
    seq_end: torch.Tensor
    """[NB] int64 exclusive packed end of the anchor's sequence."""
    q_doc: torch.Tensor
    """[M] int32 sequence id of each query, -2 for a padded anchor's."""
    q_limit: torch.Tensor
    """[M] int32 packed anchor index (context keys t < it are visible), -1 when padded."""
    q_block: torch.Tensor
    """[M] int32 block id of each query, -2 when padded."""
    kv_doc: torch.Tensor
    """[T + M] int32 sequence id of each context key, -1 on block keys."""
    kv_block: torch.Tensor
    """[T + M] int32 block id of each block key, -1 on context keys."""
    offset: int = 0
    """Packed index of row 0 of the per-token tensors read (a sequence-parallel chunk's
    start; 0 without)."""

    @property
    def num_blocks(self) -> int:
        return self.anchor.numel()

    @property
    def num_queries(self) -> int:
        return self.num_blocks * self.block_size

    @classmethod
    def build(cls, seq_lens: torch.Tensor | Sequence[int], anchors: torch.Tensor,
              block_size: int, device: torch.device | None = None,
              chunk: Sequence[int] | None = None) -> BlockLayout:
        """chunk: (start, end) of this trainer's rows under sequence parallelism (module
        docstring); None: every block, rows from 0."""
        lens = _lens(seq_lens)
        num_seqs, num_anchors = anchors.shape
        assert num_seqs == len(lens) and min(lens) > 0, (anchors.shape, lens)
        device = anchors.device if device is None else device
        blocks = _blocks(lens, anchors.cpu())
        offset = 0
        if chunk is not None:
            offset = int(chunk[0])
            blocks = _blocks_in_chunk(blocks, offset, int(chunk[1]))
        anchor, valid, seq_end, doc_B = to_device(blocks, device)
        valid = valid.bool()
        block_B = torch.arange(anchor.numel(), device=device)

        def per_query(values_B: torch.Tensor, padded: int) -> torch.Tensor:
            return torch.where(valid, values_B, padded).repeat_interleave(block_size).int()
        num_ctx = sum(lens)
        lens_S = to_device(torch.tensor(lens, dtype=torch.long), device)
        kv_doc_T = torch.arange(num_seqs, device=device).repeat_interleave(lens_S, output_size=num_ctx)
        num_q = anchor.numel() * block_size
        return cls(block_size=block_size, num_ctx=num_ctx, anchor=anchor, valid=valid,
                   seq_end=seq_end,
                   q_doc=per_query(doc_B, -2), q_limit=per_query(anchor, -1),
                   q_block=per_query(block_B, -2),
                   kv_doc=torch.cat([kv_doc_T, kv_doc_T.new_full((num_q,), -1)]).int(),
                   kv_block=torch.cat([block_B.new_full((num_ctx,), -1),
                                       block_B.repeat_interleave(block_size)]).int(),
                   offset=offset)

    def mask_mod(self) -> Callable:
        """flex mask_mod(b, h, q_idx, kv_idx) -> bool; also evaluated densely by `dense_mask`."""
        q_doc, q_limit, q_block = self.q_doc, self.q_limit, self.q_block
        kv_doc, kv_block = self.kv_doc, self.kv_block

        def dflash_mask(b, h, q_idx, kv_idx):
            context = (kv_doc[kv_idx] == q_doc[q_idx]) & (kv_idx < q_limit[q_idx])
            return context | (kv_block[kv_idx] == q_block[q_idx])
        return dflash_mask

    def dense_mask(self) -> torch.Tensor:
        """bool [M, T + M], True = may attend: the CPU reference (M x (T + M) memory)."""
        device = self.q_doc.device
        q_idx = torch.arange(self.num_queries, device=device)[:, None]
        kv_idx = torch.arange(self.num_ctx + self.num_queries, device=device)[None, :]
        return self.mask_mod()(None, None, q_idx, kv_idx)

    def flex_mask(self, sparse_block_size: int = 128) -> BlockMask:
        """The same mask as a flex BlockMask. `create_block_mask` evaluates mask_mod densely
        once, on the device: a few int32 [M, T + M] intermediates (~0.8 GB each at M = 8192,
        T = 16k; not measured here, no GPU)."""
        if FLEX_IMPORT_ERROR is not None:
            raise RuntimeError(f"a flex BlockMask needs torch >= 2.5: {FLEX_IMPORT_ERROR}")
        return create_block_mask(self.mask_mod(), None, None, self.num_queries,
                                 self.num_ctx + self.num_queries, device=self.q_doc.device,
                                 BLOCK_SIZE=sparse_block_size)

    def block_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [M], RoPE positions [M]) of the blocks: x[a_j] then mask tokens."""
        ids_BK = torch.full((self.num_blocks, self.block_size), mask_token_id,
                            dtype=input_ids.dtype, device=input_ids.device)
        ids_BK[:, 0] = torch.where(self.valid, input_ids[self.anchor_rows], mask_token_id)
        offsets = torch.arange(self.block_size, device=positions.device, dtype=positions.dtype)
        positions_BK = positions[self.anchor_rows][:, None] + offsets
        return ids_BK.flatten(), positions_BK.flatten()

    def labels_and_weights(self, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                           gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels [NB, B-1] int64, weights [NB, B-1] float32) for block positions 1..B-1;
        labels are 0 where the weight is 0 (never read)."""
        counted = self.counted(loss_mask)
        labels = torch.where(counted, input_ids[self._label_rows(input_ids)].long(), 0)
        return labels, counted.float() * position_weights(self.block_size, gamma, counted.device)

    def counted(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """[NB, B-1] bool: block position k has a trained label inside its sequence."""
        index = self.anchor[:, None] + self._offsets()
        inside = self.valid[:, None] & (index < self.seq_end[:, None])
        return inside & loss_mask.bool()[self._label_rows(loss_mask)]

    @property
    def anchor_rows(self) -> torch.Tensor:
        """[NB] row of each block's anchor in the per-token tensors read (from `offset`)."""
        return self.anchor - self.offset

    def _label_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """[NB, B-1] rows of block positions 1..B-1 in `tensor`, clamped inside it (a row
        clamped there is never counted: its label lies past its sequence's end)."""
        return (self.anchor_rows[:, None] + self._offsets()).clamp(max=tensor.shape[0] - 1)

    def _offsets(self) -> torch.Tensor:
        return torch.arange(1, self.block_size, device=self.anchor.device)


def _blocks(lens: list[int], anchors: torch.Tensor) -> torch.Tensor:
    """[4, S * N] int64 host table of every block j = s * N + n: its packed anchor index
    (its sequence's start when padded), valid (0/1), its sequence's packed end, and s."""
    num_seqs, num_anchors = anchors.shape
    lens_S = torch.tensor(lens, dtype=torch.long)
    starts_S = lens_S.cumsum(0) - lens_S
    return torch.stack([(starts_S[:, None] + anchors.clamp(min=0)).flatten(),
                        (anchors >= 0).long().flatten(),
                        (starts_S + lens_S).repeat_interleave(num_anchors),
                        torch.arange(num_seqs).repeat_interleave(num_anchors)])


def _blocks_in_chunk(blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The valid blocks of `_blocks`' table anchored in [start, end); when there are none,
    one padded block at `start` (it trains nothing, but the rank still runs the draft, and
    so the collectives inside it, like the rest of its group)."""
    anchor, valid = blocks[0], blocks[1].bool()
    kept = blocks[:, valid & (anchor >= start) & (anchor < end)]
    if kept.shape[1]:
        return kept
    return torch.tensor([[start], [0], [start + 1], [0]], dtype=torch.long)


def position_weights(block_size: int, gamma: float,
                     device: torch.device | None = None) -> torch.Tensor:
    """[B-1] float32 exp(-(k - 1) / gamma) for block positions k = 1..B-1."""
    return torch.tensor([math.exp(-k / gamma) for k in range(block_size - 1)],
                        dtype=torch.float32, device=device)


def dense_block_mask(seq_lens: torch.Tensor | Sequence[int], anchors: torch.Tensor,
                     block_size: int) -> torch.Tensor:
    """bool [M, T + M] reference mask (see the module docstring)."""
    return BlockLayout.build(seq_lens, anchors, block_size).dense_mask()


def flex_block_mask(seq_lens: torch.Tensor | Sequence[int], anchors: torch.Tensor,
                    block_size: int, sparse_block_size: int = 128) -> BlockMask:
    """The flex BlockMask of `dense_block_mask`, on the anchors' device."""
    return BlockLayout.build(seq_lens, anchors, block_size).flex_mask(sparse_block_size)


def block_labels_and_weights(input_ids: torch.Tensor, loss_mask: torch.Tensor,
                             seq_lens: torch.Tensor | Sequence[int], anchors: torch.Tensor,
                             block_size: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [S*N, B-1] int64, weights [S*N, B-1] float32), module docstring."""
    layout = BlockLayout.build(seq_lens, anchors, block_size, input_ids.device)
    return layout.labels_and_weights(input_ids, loss_mask, gamma)


def block_label_counts(loss_mask: torch.Tensor, seq_lens: torch.Tensor | Sequence[int],
                       anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B-1] int64 counted labels per block position in one micro-step: the terms N_k of
    the step's loss denominator sum_k exp(-(k-1)/gamma) N_k (the engine sums them over
    micro-steps and trainers and passes the total as `label_totals`)."""
    layout = BlockLayout.build(seq_lens, anchors, block_size, loss_mask.device)
    return layout.counted(loss_mask).sum(0)
