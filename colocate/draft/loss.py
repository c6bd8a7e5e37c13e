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
are tensors, and `DraftStepResult.stats` sums go to `colocate.metrics`, except the one
host copy of the loss mask that `label_rows` makes per micro-step.

Only rows that carry a label pay for the vocabulary (`label_rows`): the teacher runs on the
rows t+1 whose next token is trainable, and each step's norm, lm_head and soft
cross-entropy on the positions it is counted on. A prompt token's row still goes through
the decoder layer (the attention reads it), never through the [rows, Vd] head: the lm_head
is ~3 GEMMs of 2 * rows * H * Vd FLOPs per step, the largest single cost of the unroll.
Positions outside the draft vocabulary (in_draft false) stay in: a trained target keeps
few of them, and dropping them would make the random-weight bench (79% outside) read
faster than any real run.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        if logits_TV.shape[0] == 0:  # no labels at this step: the eager loop launches nothing
            kernel_mode = "eager"
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


@dataclass
class LabelRows:
    """Which rows of one micro-step carry a label (see the module docstring); on the device."""

    teacher: torch.Tensor | None
    """[N] local rows r whose next token x_{r+1} is trainable in r's sequence: the rows
    the teacher must score (None: the teacher scored every local row)."""
    head: list[torch.Tensor]
    """Per step k, [M_k] the chunk rows t where counted(k, t): where step k runs its head."""
    src: list[torch.Tensor]
    """Per step k, [M_k] the teacher's row for each of them (t + 1 + k, as an index into
    the teacher's rows)."""


def label_rows(loss_mask: torch.Tensor, seq_bounds: list[tuple[int, int]], unroll_steps: int,
               num_tokens: int, offset: int = 0, *, compact_teacher: bool = True) -> LabelRows:
    """The `LabelRows` of a packed micro-step, built on the host from `loss_mask` (this
    chunk's rows and halo from global row `offset`; one device-to-host copy when on the
    GPU, the unroll's one sync) and the host-side `seq_bounds`. num_tokens: the chunk's
    own rows (the draft's positions). compact_teacher=False: `src` indexes all local rows
    (for a teacher that scored them all)."""
    device = loss_mask.device
    mask = loss_mask.detach().bool().cpu()
    local = torch.arange(mask.numel())
    seq_end = seq_end_per_token(seq_bounds, torch.device("cpu"))[offset:offset + mask.numel()]
    # The last chunk's halo is padding past the batch: an end of 0 counts none of its rows.
    seq_end = torch.cat([seq_end, seq_end.new_zeros(mask.numel() - seq_end.numel())])
    # next_trainable[r]: x_{r+1} is in r's sequence and trainable. The last local row's
    # successor lies past this chunk's halo; no step reads it (sp_halo leaves a row spare).
    next_trainable = ((local + offset + 1 < seq_end) & (local + 1 < mask.numel())
                      & mask[(local + 1).clamp(max=mask.numel() - 1)])
    teacher = next_trainable.nonzero().flatten()
    if compact_teacher:
        slot = torch.full((mask.numel(),), -1, dtype=torch.long)
        slot[teacher] = torch.arange(teacher.numel())
    else:
        slot = local
    index = torch.arange(offset, offset + num_tokens)
    head, src = [], []
    for step in range(unroll_steps):
        # t+1+step, clamped inside t's sequence: a clamped row is a sequence's last, whose
        # next token lies outside it, so it is never counted (counted == next_trainable[src]).
        src_T = torch.minimum(index + 1 + step, seq_end[:num_tokens] - 1) - offset
        rows = next_trainable[src_T].nonzero().flatten()
        head.append(to_device(rows, device))
        src.append(to_device(slot[src_T[rows]], device))
    return LabelRows(teacher=to_device(teacher, device) if compact_teacher else None,
                     head=head, src=src)


def label_counts(seq_lens: torch.Tensor | list[int], loss_mask: torch.Tensor,
                 unroll_steps: int) -> torch.Tensor:
    """[K] int64 counted positions of each unroll step in one packed micro-batch: the terms
    of the loss denominators N_k. On loss_mask's device (the engine counts on the host,
    while packing, before the step's first prefill)."""
    rows = label_rows(loss_mask, seq_bounds_from_lens(seq_lens), unroll_steps,
                      loss_mask.numel(), compact_teacher=False)
    return to_device(torch.tensor([h.numel() for h in rows.head]), loss_mask.device)


def eagle3_unroll(draft: Eagle3Draft, embed_weight: torch.Tensor, aux_hidden: torch.Tensor,
                  target: TargetDistribution, input_ids: torch.Tensor,
                  loss_mask: torch.Tensor, positions: torch.Tensor,
                  seq_lens: torch.Tensor | list[int], unroll_steps: int, position_decay: float,
                  label_totals: torch.Tensor | None = None,
                  chunk_tokens: int = 4096, offset: int = 0,
                  rows: LabelRows | None = None) -> DraftStepResult:
    """Eagle3 TTT unroll over one packed micro-step (see the module docstring).

    embed_weight [V, H] frozen target embedding (never receives gradient); aux_hidden
    [T, num_aux * H]; target: the teacher's distribution (`colocate.draft.teacher`) on the
    rows `rows.teacher` names (`label_rows` of this micro-step), or on every local row when
    `rows` is None;
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
    if rows is None:
        rows = label_rows(loss_mask, seq_bounds, unroll_steps, num_tokens, offset,
                          compact_teacher=False)

    kv_cache = KVCache()
    hidden = aux_hidden
    ce_sums, hits, hit_rows = [], [], []
    for step in range(unroll_steps):
        # Input token of this step: x_{t+1+step}, clamped inside t's own sequence so no
        # position ever reads another sequence (a clamped position is not counted).
        src_T = torch.minimum(index_T + 1 + step, seq_end_T - 1) - offset  # local rows
        embeds_TH = F.embedding(input_ids[src_T], embed_weight)
        head_M, src_M = rows.head[step], rows.src[step]
        # Carried: one reduce-scatter per FSDP2 unit and optimizer step (eagle3.Carried).
        hidden, logits_MV = draft(embeds_TH, Carried(hidden), positions, seq_bounds, kv_cache,
                                  head_rows=head_M)
        scored_M = target.in_draft[src_M]  # loss positions among the counted ones
        ce_k, draft_top_M = soft_cross_entropy(logits_MV, target, src_M, scored_M.float(),
                                                 chunk_tokens, draft.kernels)
        ce_sums.append(ce_k)
        with torch.no_grad():
            hit_M = (draft_top_M == target.top[src_M]) & scored_M
            hit_rows.append(torch.zeros(num_tokens, dtype=torch.bool, device=device)
                            .index_put_((head_M,), hit_M))
            hits.append(hit_M.sum())
    ce_sum = torch.stack(ce_sums)
    counted = to_device(torch.tensor([h.numel() for h in rows.head]), device)
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
