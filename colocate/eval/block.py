"""Block drafting with a DFlash draft, as sglang 0.5.17's DFLASH worker runs it
(srt/speculative/dflash_worker_v2.py), in plain torch for the reference decoder.

One verify cycle, with n tokens committed to the target's KV cache (x_0..x_{n-1}) and the
target's bonus token x_n not yet run through it:

    block      [x_n, MASK x (B-1)] embedded with the target's embedding, RoPE positions
               n .. n+B-1 (sglang: prefix_lens + arange(B))
    context    ctx_t = hidden_norm(fc(aux_t)) for t = 0..n-1, the target layer outputs of the
               committed tokens, projected once when they are committed (sglang:
               `_append_target_hidden_*` into the draft's KV cache), RoPE positions 0..n-1
    attention  every block query sees all n context keys (t < n: strictly before the block)
               and the whole block (ENCODER_ONLY, bidirectional)
    proposals  greedy argmax of the target lm_head over block positions 1..B-1 (the draft's
               own final norm, not the target's)

The target then verifies [x_n, d_1..d_{B-1}] greedily (`chain.chain_generate`, the same loop
as Eagle3) and commits x_n plus the a accepted drafts: their target features extend the
context, and the bonus token seeds the next block. The block's own keys are never kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from colocate.draft.dflash import DFlashDraft


class BlockDraft:
    """A DFlash draft proposing whole blocks against the committed target features."""

    def __init__(self, model: DFlashDraft, embed_weight_VH: torch.Tensor,
                 lm_head_weight_VH: torch.Tensor):
        self.model, self.embed_weight, self.lm_head_weight = model, embed_weight_VH, lm_head_weight_VH
        self.mask_token_id = model.arch.mask_token_id
        self.block_size = model.arch.block_size
        self.reset()

    def reset(self) -> None:
        param = self.model.fc.weight
        self.ctx = torch.empty(0, param.shape[0], dtype=param.dtype, device=param.device)
        self.last_token: int | None = None

    @property
    def num_committed(self) -> int:
        """Positions whose target features are in the context (the target's KV length)."""
        return self.ctx.shape[0]

    @torch.no_grad()
    def extend(self, aux_TA: torch.Tensor, next_tokens: list[int]) -> None:
        """Newly committed positions: their target features aux [T, K*H] and the token after
        each (the last one, not yet committed, starts the next block)."""
        assert aux_TA.shape[0] == len(next_tokens) > 0, (aux_TA.shape, len(next_tokens))
        self.ctx = torch.cat([self.ctx, self.model.project_context(aux_TA)])
        self.last_token = next_tokens[-1]

    @torch.no_grad()
    def block_logits(self, num_steps: int) -> torch.Tensor:
        """Logits [num_steps, V] of block positions 1..num_steps (a block of num_steps + 1)."""
        assert self.last_token is not None, "extend() before proposing"
        device = self.ctx.device
        num_ctx, size = self.num_committed, num_steps + 1
        ids = torch.full((size,), self.mask_token_id, dtype=torch.long, device=device)
        ids[0] = self.last_token
        ctx_positions = torch.arange(num_ctx, device=device)
        positions = torch.arange(num_ctx, num_ctx + size, device=device)
        # The whole context lies strictly before the block: everything may be attended.
        mask = torch.ones(size, num_ctx + size, dtype=torch.bool, device=device)
        hidden = self.model(F.embedding(ids, self.embed_weight), positions, self.ctx,
                            ctx_positions, mask)
        return F.linear(hidden[1:], self.lm_head_weight.to(hidden.dtype))

    def propose(self, num_steps: int) -> list[int]:
        return self.block_logits(num_steps).argmax(-1).tolist()
