"""DFlash objective over one packed micro-step: blocks -> draft -> target lm_head -> loss.

Layout and conventions (anchors, mask, labels, weights) are `colocate.draft.dflash_blocks`'.

    loss = sum_{j,k} w_jk * CE_jk / W,  CE_jk = -log softmax(lm_head(draft_out_jk))[x[a_j + k]]

W = sum_k exp(-(k-1)/gamma) * N_k with N_k = `label_totals`, the counted labels of block
position k over the whole optimizer step (every micro-step on every trainer, from
`block_label_counts`), so summing the micro-steps' losses gives one per-label mean of the
step; without label_totals, W is this micro-step's own sum of weights.

Logits come from the target's frozen lm_head applied directly to the draft's final `norm`
output (sglang's DFLASH does exactly that; no target final norm), in row chunks: the
[rows, V] float32 logits never exist at once, and the gradient with respect to the draft
output is formed chunk by chunk in the forward pass (only it, [rows, H], is kept).

Statistics (`DraftStepResult.stats`, the `colocate.metrics` layout with K = B - 1 positions):
ce_k (unweighted CE summed over position k's counted labels), hits_k (argmax == label),
counted_k, and (sim_tokens, sim_cycles) = (sum over valid anchors of 1 + the leading run of
hits from position 1, the number of valid anchors): `metrics.accept_length` of them is the
accept length of block drafting simulated on the trained tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from colocate.draft.dflash import DFlashDraft
from colocate.draft.dflash_blocks import BlockLayout, position_weights
from colocate.draft.flex import use_flex
from colocate.draft.recipe import DraftStepResult
from colocate.draft.kernels import upcast
from colocate.draft.teacher import LOGIT_CHUNK_TOKENS


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_r w_r * CE(hidden_r @ head^T, label_r), chunked over rows; also returns the
    per-row CE and argmax (no grad). Gradient only to `hidden` (the head is frozen)."""

    @staticmethod
    def forward(ctx, hidden_RH, head_VH, labels_R, weight_R, chunk_rows):
        num_rows = hidden_RH.shape[0]
        grad_RH = torch.empty_like(hidden_RH)
        ce_dtype = torch.promote_types(head_VH.dtype, torch.float32)
        ce_R = torch.empty(num_rows, dtype=ce_dtype, device=hidden_RH.device)
        top_R = torch.empty(num_rows, dtype=torch.long, device=hidden_RH.device)
        for start in range(0, num_rows, chunk_rows):
            end = min(start + chunk_rows, num_rows)
            z_CV = upcast(hidden_RH[start:end].to(head_VH.dtype) @ head_VH.T)
            lse_C = torch.logsumexp(z_CV, dim=-1)
            labels_C = labels_R[start:end]
            ce_R[start:end] = lse_C - z_CV.gather(1, labels_C[:, None])[:, 0]
            top_R[start:end] = z_CV.argmax(-1)
            # d CE / d z = softmax(z) - onehot(label), scaled by the row's weight.
            grad_CV = torch.exp(z_CV - lse_C[:, None])
            grad_CV[torch.arange(end - start, device=grad_CV.device), labels_C] -= 1
            grad_CV *= weight_R[start:end, None].to(grad_CV.dtype)
            grad_RH[start:end] = (grad_CV.to(head_VH.dtype) @ head_VH).to(grad_RH.dtype)
        loss = (weight_R.to(ce_R.dtype) * ce_R).sum()
        ctx.save_for_backward(grad_RH)
        ctx.mark_non_differentiable(ce_R, top_R)
        return loss, ce_R, top_R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_top):
        (grad_RH,) = ctx.saved_tensors
        return grad_RH * grad_loss.to(grad_RH.dtype), None, None, None, None


def step_denominator(label_totals: torch.Tensor, block_size: int, gamma: float) -> torch.Tensor:
    """W = sum_k exp(-(k-1)/gamma) * N_k, float32 on label_totals' device."""
    weights = position_weights(block_size, gamma, label_totals.device)
    return (weights * label_totals.to(weights.dtype)).sum()


def dflash_forward(model: DFlashDraft, embed_weight: torch.Tensor,
                   lm_head_weight: torch.Tensor, target_hidden: torch.Tensor,
                   input_ids: torch.Tensor, loss_mask: torch.Tensor, positions: torch.Tensor,
                   seq_lens: torch.Tensor | Sequence[int], anchors: torch.Tensor, *,
                   gamma: float, block_size: int | None = None,
                   label_totals: torch.Tensor | None = None,
                   chunk_tokens: int = LOGIT_CHUNK_TOKENS,
                   accepted_T: torch.Tensor | None = None,
                   sp_chunk: Sequence[int] | None = None) -> DraftStepResult:
    """DFlash loss and statistics of one packed micro-step.

    embed_weight [V, H], lm_head_weight [V, H]: the target's, frozen (never get gradient);
    target_hidden [T, K*H]: the K target layer outputs, concatenated; input_ids, loss_mask,
    positions [T]; seq_lens [S] on the host; anchors [S, N] from `draw_anchors` (any
    device); gamma: `draft.block_decay`; block_size: the arch's when None; label_totals
    [B-1]: N_k of the whole optimizer step (None: this micro-step's); chunk_tokens: rows of
    the [rows, V] logits formed at once. The mask is a flex BlockMask when
    `model.attention` resolves to flex on this device, else the dense reference.
    accepted_T [T] int64: when given, each valid anchor's accepted drafts are written at its
    packed index (what a verify cycle with tokens committed through the anchor accepts:
    `metrics.replay_serving`'s input).

    Sequence parallelism (colocate/sequence_parallel.py): sp_chunk = (start, end), this
    trainer's rows of the micro-batch: target_hidden and positions are the chunk's rows,
    input_ids, loss_mask (and accepted_T) rows from `start` with the halo; seq_lens and the
    anchors are the whole micro-batch's (with its padding sequence). The blocks anchored in
    the chunk are trained here, and the draft gathers the context of the group.
    """
    assert (sp_chunk is None) == (model.sp_group is None), "a chunk needs the group's context"
    arch = model.arch
    block_size = arch.block_size if block_size is None else block_size
    device = input_ids.device
    layout = BlockLayout.build(seq_lens, anchors, block_size, device, chunk=sp_chunk)
    mask = layout.flex_mask() if use_flex(model.attention, device) else layout.dense_mask()

    block_ids_M, block_positions_M = layout.block_inputs(input_ids, positions, arch.mask_token_id)
    block_embeds_MH = F.embedding(block_ids_M, embed_weight.detach())
    out_MH = model(block_embeds_MH, block_positions_M, target_hidden, positions, mask,
                   project=True)

    # Block position 0 (the anchor token) predicts nothing: rows of positions 1..B-1 only.
    num_blocks = layout.num_blocks
    pred_RH = out_MH.view(num_blocks, block_size, -1)[:, 1:].reshape(-1, out_MH.shape[-1])
    labels_BK, weights_BK = layout.labels_and_weights(input_ids, loss_mask, gamma)
    weighted_ce, ce_R, top_R = _HeadCrossEntropy.apply(
        pred_RH, lm_head_weight.detach(), labels_BK.flatten(), weights_BK.flatten(),
        chunk_tokens)
    denom = weights_BK.sum() if label_totals is None else \
        step_denominator(label_totals, block_size, gamma)
    loss = weighted_ce / denom.clamp(min=1e-6).to(weighted_ce.dtype)

    with torch.no_grad():
        counted_BK = weights_BK > 0
        hits_BK = (top_R.view(num_blocks, -1) == labels_BK) & counted_BK
        ce_sum = (ce_R.view(num_blocks, -1) * counted_BK).sum(0)
        lead_B = hits_BK.long().cumprod(1).sum(1)  # drafts a verify would accept
        sim = torch.stack([(layout.valid * (1 + lead_B)).sum(), layout.valid.sum()])
        if accepted_T is not None:
            accepted_T[layout.anchor_rows[layout.valid]] = lead_B[layout.valid]
    return DraftStepResult(loss=loss, ce_sum=ce_sum, hits=hits_BK.sum(0),
                        counted=counted_BK.sum(0), sim=sim)
