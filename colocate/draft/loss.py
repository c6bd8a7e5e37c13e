"""Eagle3 test-time-training (TTT) loss: target distribution, unroll, metrics.

Shift convention on packed sequences (T tokens, index t, token x_t; all indices stay
inside t's own sequence):

    step k at index t    input hidden  fc(aux_t) for k = 0, else draft step k-1 output at t
                         input token   x_{t+1+k} (its frozen target embedding)
                         RoPE position positions[t] + k
                         trained on    target_p[t+1+k] (the target's distribution for x_{t+2+k})
    valid(k, t)          t+2+k is in the same sequence, loss_mask[t+2+k] (the predicted token
                         is trainable) and in_draft[t+1+k] (the target's full-vocab argmax
                         there is in the draft vocabulary)

This is SpecForge's convention (its target model shifts input_ids and the logits left by one
before step 0, and shifts them again after every step) except for the loss mask, which
SpecForge applies unshifted (loss_mask[t+k]); we take the mask of the token being predicted.

Soft cross-entropy  -sum_v target_p * log_softmax(logits)  per position, averaged over the
valid positions of the step (0 when none); total = sum_k decay^k * loss_k. Nothing here
synchronises with the device: results are tensors; `unroll_metrics` turns them into floats
on log steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from colocate.draft import kernels
from colocate.draft.attention import seq_bounds_from_lens
from colocate.draft.eagle3 import Eagle3Draft, KVCache
from colocate.draft.kernels import upcast
from colocate.hostcopy import to_device


@dataclass
class TargetDistribution:
    """The frozen target's next-token distribution per position, over the draft vocabulary.

    Kept as logits in the head's dtype plus a float32 log-sum-exp, not as float32
    probabilities: half the memory and half the reads per unroll step, and no precision
    lost (the logits come out of a bf16 matmul); p = exp(logits - lse).
    """

    logits: torch.Tensor
    """[T, Vd] target logits of the draft-vocabulary tokens, in the lm_head's dtype."""
    lse: torch.Tensor
    """[T] log-sum-exp of `logits` rows, float32 (float64 for float64 heads)."""
    in_draft: torch.Tensor
    """[T] bool: the full-vocabulary argmax is a draft-vocabulary token."""
    top: torch.Tensor
    """[T] int64 draft-vocabulary index of the most likely draft token."""

    def probs(self) -> torch.Tensor:
        """[T, Vd] probabilities (materialised: for tests and references)."""
        return torch.exp(upcast(self.logits) - self.lse[:, None])


@torch.no_grad()
def target_distribution(last_hidden_TH: torch.Tensor, lm_head_weight_VH: torch.Tensor,
                        draft_ids: torch.Tensor, chunk_tokens: int = 2048) -> TargetDistribution:
    """Frozen target head on the final-norm hidden states, softmax over the draft vocabulary.

    Full-vocab logits exist for `chunk_tokens` rows at a time only ([chunk, V] is the memory
    peak): they are needed for the argmax that decides `in_draft`.
    """
    num_tokens = last_hidden_TH.shape[0]
    device = last_hidden_TH.device
    is_draft_V = torch.zeros(lm_head_weight_VH.shape[0], dtype=torch.bool, device=device)
    is_draft_V[draft_ids] = True
    logits_TV = torch.empty(num_tokens, draft_ids.numel(), dtype=lm_head_weight_VH.dtype,
                            device=device)
    in_draft = torch.empty(num_tokens, dtype=torch.bool, device=device)
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        full_CV = last_hidden_TH[start:end].to(lm_head_weight_VH.dtype) @ lm_head_weight_VH.T
        in_draft[start:end] = is_draft_V[full_CV.argmax(-1)]
        torch.index_select(full_CV, 1, draft_ids, out=logits_TV[start:end])
    return TargetDistribution(logits=logits_TV, lse=torch.logsumexp(upcast(logits_TV), dim=-1),
                              in_draft=in_draft, top=logits_TV.argmax(-1))


class _SoftCrossEntropy(torch.autograd.Function):
    """sum_t w_t * (-sum_v p[src_t, v] * log_softmax(logits_t)_v), chunked over rows when eager.

    Plain autograd would keep an [T, Vd] float32 log-softmax and the gathered target rows per
    unroll step for backward (7 steps x 16k tokens x 32k vocab x 4 B x 2 = 29 GB). Here the
    gradient is formed in the forward pass (`kernels.soft_ce_rows`, one fused kernel pair
    when compiled) and only it is kept, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits_TV, target: TargetDistribution, src_T, weight_T, chunk_tokens,
                kernel_mode):
        rows = kernels.pick(kernels.soft_ce_rows, kernel_mode, logits_TV.device)
        if rows is not kernels.soft_ce_rows:
            # Fused: no [rows, Vd] float32 intermediate exists, so one call over all rows
            # (and the gradient it returns is kept as is, not copied into a buffer).
            loss, grad_TV = rows(logits_TV, target.logits, target.lse, src_T, weight_T)
            ctx.save_for_backward(grad_TV)
            return loss
        grad_TV = torch.empty_like(logits_TV)
        loss = torch.zeros((), dtype=upcast(logits_TV).dtype, device=logits_TV.device)
        for start in range(0, logits_TV.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, logits_TV.shape[0])
            chunk_loss, grad_TV[start:end] = rows(logits_TV[start:end], target.logits,
                                                  target.lse, src_T[start:end],
                                                  weight_T[start:end])
            loss = loss + chunk_loss
        ctx.save_for_backward(grad_TV)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad_TV,) = ctx.saved_tensors
        return grad_TV * grad_loss.to(grad_TV.dtype), None, None, None, None, None


def soft_cross_entropy(logits_TV: torch.Tensor, target: TargetDistribution, src_T: torch.Tensor,
                       weight_T: torch.Tensor, chunk_tokens: int = 4096,
                       kernel_mode: str = "eager") -> torch.Tensor:
    """Weighted soft cross-entropy of logits row t against the target's row src_t.

    Scalar in float32 (float64 for float64 logits); gradient only to the logits.
    kernel_mode: `draft.kernels` (see `colocate.draft.kernels`).
    """
    return _SoftCrossEntropy.apply(logits_TV, target, src_T, weight_T, chunk_tokens,
                                   kernel_mode)


@dataclass
class UnrollResult:
    loss: torch.Tensor
    """Scalar with grad: sum_k decay^k * step_losses[k]."""
    step_losses: torch.Tensor
    """[K] detached per-step losses (mean over valid positions)."""
    acc: torch.Tensor
    """[K] fraction of valid positions where the draft argmax is the target's top draft token."""
    num_valid: torch.Tensor
    """[K] int64 valid positions per step (for token-weighted averaging across micro-steps)."""


def _seq_end_per_token(seq_bounds: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[T] exclusive end index of each token's sequence, built on the host."""
    ends = torch.tensor([end for _, end in seq_bounds], dtype=torch.long)
    lens = torch.tensor([end - start for start, end in seq_bounds], dtype=torch.long)
    return to_device(torch.repeat_interleave(ends, lens), device)


def eagle3_unroll(draft: Eagle3Draft, embed_weight: torch.Tensor, aux_hidden: torch.Tensor,
                  target: TargetDistribution, input_ids: torch.Tensor,
                  loss_mask: torch.Tensor, positions: torch.Tensor,
                  seq_lens: torch.Tensor | list[int], unroll_steps: int, position_decay: float,
                  chunk_tokens: int = 4096) -> UnrollResult:
    """Eagle3 TTT unroll over one packed micro-step (see the module docstring).

    embed_weight [V, H] frozen target embedding (never receives gradient); aux_hidden
    [T, num_aux * H]; target from `target_distribution`;
    input_ids [T]; loss_mask [T] bool; positions [T]; seq_lens [S] on the host (CPU tensor
    or list; the attention loops over sequences with them).
    """
    num_tokens = input_ids.shape[0]
    device = input_ids.device
    seq_bounds = seq_bounds_from_lens(seq_lens)
    seq_end_T = _seq_end_per_token(seq_bounds, device)
    index_T = torch.arange(num_tokens, device=device)
    loss_mask = loss_mask.bool()
    embed_weight = embed_weight.detach()

    kv_cache = KVCache()
    hidden = aux_hidden
    total = torch.zeros((), dtype=torch.float32, device=device)  # promoted by float64 steps
    step_losses, accs, counts = [], [], []
    for step in range(unroll_steps):
        # Input token / target row of this step: t+1+step, clamped inside t's own sequence
        # so no position ever reads another sequence (a clamped position is invalid anyway).
        src_T = torch.minimum(index_T + 1 + step, seq_end_T - 1)
        label_T = index_T + 2 + step
        valid_T = (label_T < seq_end_T) & loss_mask[label_T.clamp(max=num_tokens - 1)] \
            & target.in_draft[src_T]
        num_valid = valid_T.sum()
        denom = num_valid.clamp(min=1)

        embeds_TH = F.embedding(input_ids[src_T], embed_weight)
        hidden, logits_TV = draft(embeds_TH, hidden, positions, seq_bounds, kv_cache)
        loss_k = soft_cross_entropy(logits_TV, target, src_T, valid_T.float() / denom,
                                    chunk_tokens, draft.kernels)
        total = total + position_decay ** step * loss_k
        with torch.no_grad():
            hits = (logits_TV.argmax(-1) == target.top[src_T]) & valid_T
            accs.append(hits.sum() / denom)
        step_losses.append(loss_k.detach())
        counts.append(num_valid)
    return UnrollResult(loss=total, step_losses=torch.stack(step_losses),
                        acc=torch.stack(accs), num_valid=torch.stack(counts))


def simulated_accept_length(acc: Sequence[float]) -> float:
    """Expected tokens per verify step of a chain draft: 1 + sum_k prod_{j<=k} acc_j.

    Assumes step k's acceptance is independent of the earlier steps given acc_k (acc_k is
    measured on teacher-forced positions, whatever happened before), and counts the bonus
    token the target always emits. Tree drafts accept more; real chains correlate steps.
    """
    expected, survive = 1.0, 1.0
    for a in acc:
        survive *= float(a)
        expected += survive
    return expected


def unroll_metrics(result: UnrollResult) -> dict[str, float]:
    """Floats for logging: one device-to-host transfer (a sync point; call on log steps)."""
    num_steps = result.acc.numel()
    packed = torch.cat([result.loss.detach().float().reshape(1), result.step_losses.float(),
                        result.acc.float(), result.num_valid.float()]).tolist()
    losses, accs = packed[1:1 + num_steps], packed[1 + num_steps:1 + 2 * num_steps]
    metrics = {"loss": packed[0], "accept_length": simulated_accept_length(accs)}
    for k in range(num_steps):
        metrics[f"loss_{k}"] = losses[k]
        metrics[f"acc_{k}"] = accs[k]
        metrics[f"valid_{k}"] = packed[1 + 2 * num_steps + k]
    return metrics
