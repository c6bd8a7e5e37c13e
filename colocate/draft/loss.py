"""Eagle3 test-time-training (TTT) loss: target distribution, unroll, statistics.

Shift convention on packed sequences (T tokens, index t, token x_t; all indices stay
inside t's own sequence):

    step k at index t    input hidden  fc(aux_t) for k = 0, else draft step k-1 output at t
                         input token   x_{t+1+k} (its frozen target embedding)
                         RoPE position positions[t] + k
                         trained on    target_p[t+1+k] (the target's distribution for x_{t+2+k})
    counted(k, t)        t+2+k is in the same sequence and loss_mask[t+2+k] (the predicted
                         token is trainable): the positions step k is scored on
    in_draft             in_draft[t+1+k]: the target's full-vocabulary argmax for x_{t+2+k}
                         is a draft-vocabulary token
    loss position        counted and in_draft
    hit(k, t)            a loss position where the draft's argmax is the target's argmax

This is SpecForge's convention (its target model shifts input_ids and the logits left by one
before step 0, and shifts them again after every step) except for the loss mask, which
SpecForge applies unshifted (loss_mask[t+k]); we take the mask of the token being predicted.

A counted position whose target argmax is outside the draft vocabulary is a *miss*: it stays
in every denominator (acc_k's and the loss's N_k) but contributes no loss, because the draft
can never propose that token (its distribution restricted to the draft vocabulary is not what
serving will be judged on). Skipping it instead would flatter acc_k by exactly the share of
tokens the draft cannot produce.

Soft cross-entropy  -sum_v target_p * log_softmax(logits)  per loss position, summed per step
(ce_k). The loss is per token over the whole optimizer step: sum_k decay^k * ce_k / N_k, N_k
= counted positions of step k over all micro-steps of the step on all trainers
(`label_counts`, which the engine evaluates before the step's first backward; without
them, this micro-step's own counts). Nothing here synchronises with the device: results
are tensors, and `DraftStepResult.stats` sums go to `colocate.metrics`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from colocate import metrics
from colocate.draft import kernels, soft_ce_triton
from colocate.draft.attention import seq_bounds_from_lens
from colocate.draft.eagle3 import Carried, Eagle3Draft, KVCache
from colocate.draft.kernels import upcast
from colocate.draft.recipe import DraftStepResult
from colocate.draft.teacher import TargetDistribution
from colocate.hostcopy import to_device
from colocate.sequence_parallel import summarize_whole


class _SoftCrossEntropy(torch.autograd.Function):
    """sum_t w_t * (-sum_v p[src_t, v] * log_softmax(logits_t)_v), chunked over rows when eager;
    also each row's argmax (no gradient), from the same pass over the logits.

    Plain autograd would keep an [T, Vd] float32 log-softmax and the gathered target rows per
    unroll step for backward (7 steps x 16k tokens x 32k vocab x 4 B x 2 = 29 GB). Here the
    gradient is formed in the forward pass (`kernels.soft_ce_rows`, one fused kernel pair
    when compiled) and only it is kept, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits_TV, target: TargetDistribution, src_T, weight_T, chunk_tokens,
                kernel_mode):
        rows = kernels.pick(kernels.soft_ce_rows, kernel_mode, logits_TV.device)
        if rows is not kernels.soft_ce_rows and soft_ce_triton.usable(logits_TV):
            rows = soft_ce_triton.soft_ce_rows  # hand-written: one program per row
        ctx.kernel_mode = kernel_mode
        if rows is not kernels.soft_ce_rows:
            # Fused: no [rows, Vd] float32 intermediate exists, so one call over all rows
            # (and the gradient it returns is kept as is, not copied into a buffer).
            loss, grad_TV, top_T = rows(logits_TV, target.logits, target.lse, src_T, weight_T)
        else:
            grad_TV = torch.empty_like(logits_TV)
            top_T = torch.empty(logits_TV.shape[0], dtype=torch.long, device=logits_TV.device)
            loss = torch.zeros((), dtype=upcast(logits_TV).dtype, device=logits_TV.device)
            for start in range(0, logits_TV.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, logits_TV.shape[0])
                chunk_loss, grad_TV[start:end], top_T[start:end] = rows(
                    logits_TV[start:end], target.logits, target.lse, src_T[start:end],
                    weight_T[start:end])
                loss = loss + chunk_loss
        ctx.save_for_backward(grad_TV)
        ctx.mark_non_differentiable(top_T)
        return loss, top_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_top):
        del grad_top  # an index: no gradient
        (grad_TV,) = ctx.saved_tensors
        scale = kernels.pick(kernels.scale, ctx.kernel_mode, grad_TV.device)
        return scale(grad_TV, grad_loss), None, None, None, None, None


def soft_cross_entropy(logits_TV: torch.Tensor, target: TargetDistribution, src_T: torch.Tensor,
                       weight_T: torch.Tensor, chunk_tokens: int = 4096,
                       kernel_mode: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted soft cross-entropy of logits row t against the target's row src_t, and
    [T] int64 argmax of each logits row (no gradient).

    Scalar in float32 (float64 for float64 logits); gradient only to the logits.
    kernel_mode: `draft.kernels` (see `colocate.draft.kernels`).
    """
    return _SoftCrossEntropy.apply(logits_TV, target, src_T, weight_T, chunk_tokens,
                                   kernel_mode)


def seq_end_per_token(seq_bounds: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[T] exclusive end index of each token's sequence, built on the host."""
    ends = torch.tensor([end for _, end in seq_bounds], dtype=torch.long)
    lens = torch.tensor([end - start for start, end in seq_bounds], dtype=torch.long)
    return to_device(torch.repeat_interleave(ends, lens), device)


def _counted(step: int, index_T: torch.Tensor, seq_end_T: torch.Tensor,
             loss_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[T] bool counted(step, t) of the module docstring. index_T: global indices;
    loss_mask: rows from `offset` on (with sequence parallelism, a chunk and its halo)."""
    label_T = index_T + 2 + step
    return (label_T < seq_end_T) & loss_mask[(label_T - offset).clamp(max=loss_mask.numel() - 1)]


def label_counts(seq_lens: torch.Tensor | list[int], loss_mask: torch.Tensor,
                 unroll_steps: int) -> torch.Tensor:
    """[K] int64 counted positions of each unroll step in one packed micro-batch: the terms
    of the loss denominators N_k. On loss_mask's device (the engine counts on the host,
    while packing, before the step's first prefill)."""
    loss_mask = loss_mask.bool()
    seq_end_T = seq_end_per_token(seq_bounds_from_lens(seq_lens), loss_mask.device)
    index_T = torch.arange(loss_mask.numel(), device=loss_mask.device)
    return torch.stack([_counted(k, index_T, seq_end_T, loss_mask).sum()
                        for k in range(unroll_steps)])


def eagle3_unroll(draft: Eagle3Draft, embed_weight: torch.Tensor, aux_hidden: torch.Tensor,
                  target: TargetDistribution, input_ids: torch.Tensor,
                  loss_mask: torch.Tensor, positions: torch.Tensor,
                  seq_lens: torch.Tensor | list[int], unroll_steps: int, position_decay: float,
                  label_totals: torch.Tensor | None = None,
                  chunk_tokens: int = 4096, offset: int = 0) -> DraftStepResult:
    """Eagle3 TTT unroll over one packed micro-step (see the module docstring).

    embed_weight [V, H] frozen target embedding (never receives gradient); aux_hidden
    [T, num_aux * H]; target from `target_distribution`;
    input_ids [T]; loss_mask [T] bool; positions [T]; seq_lens [S] on the host (CPU tensor
    or list; the attention loops over sequences with them); label_totals [K] N_k of the
    whole optimizer step on the device (None: this micro-step's counts, i.e. a per-token
    mean over this micro-step alone).

    Sequence parallelism (colocate/sequence_parallel.py): this trainer's rows are a chunk
    of the micro-batch starting at global index `offset` (aux_hidden, positions: the
    chunk; input_ids, loss_mask and target: the chunk and its halo), seq_lens are the
    whole micro-batch's, and the draft's attention exchanges heads within its group.
    """
    num_tokens = positions.shape[0]
    device = input_ids.device
    seq_bounds = seq_bounds_from_lens(seq_lens)
    seq_end_all = seq_end_per_token(seq_bounds, device)
    seq_end_T = seq_end_all[offset:offset + num_tokens]
    index_T = torch.arange(offset, offset + num_tokens, device=device)
    loss_mask = loss_mask.bool()
    embed_weight = embed_weight.detach()

    kv_cache = KVCache()
    hidden = aux_hidden
    ce_sums, hits, hit_rows, counts = [], [], [], []
    for step in range(unroll_steps):
        # Input token / target row of this step: t+1+step, clamped inside t's own sequence
        # so no position ever reads another sequence (a clamped position is not counted).
        src_T = torch.minimum(index_T + 1 + step, seq_end_T - 1) - offset  # local rows
        counted_T = _counted(step, index_T, seq_end_T, loss_mask, offset)
        scored_T = counted_T & target.in_draft[src_T]  # loss positions

        embeds_TH = F.embedding(input_ids[src_T], embed_weight)
        # Carried: one reduce-scatter per FSDP2 unit and optimizer step (eagle3.Carried).
        hidden, logits_TV = draft(embeds_TH, Carried(hidden), positions, seq_bounds, kv_cache)
        ce_k, draft_top_T = soft_cross_entropy(logits_TV, target, src_T, scored_T.float(),
                                                 chunk_tokens, draft.kernels)
        ce_sums.append(ce_k)
        with torch.no_grad():
            hit_T = (draft_top_T == target.top[src_T]) & scored_T
            hit_rows.append(hit_T)
            hits.append(hit_T.sum())
        counts.append(counted_T.sum())
    ce_sum, counted = torch.stack(ce_sums), torch.stack(counts)
    denom = (counted if label_totals is None else label_totals).to(ce_sum.dtype).clamp(min=1)
    loss = sum(position_decay ** k * ce_sum[k] / denom[k] for k in range(unroll_steps))
    with torch.no_grad():
        # The serving walk crosses chunks: with sequence parallelism it replays the whole
        # micro-batch, counted once per group.
        sim = summarize_whole(
            lambda hits_TK, mask_T: metrics.sim_accept_sums(hits_TK.T, mask_T, seq_end_all),
            [torch.stack(hit_rows).T, loss_mask[:num_tokens]], draft.sp_group)
    return DraftStepResult(loss=loss, ce_sum=ce_sum, hits=torch.stack(hits), counted=counted,
                        sim=sim)
