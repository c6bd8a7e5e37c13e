"""The Eagle3 teacher: the frozen target head's next-token distribution over the draft vocabulary.

For every position the trainer needs the target's logits of the draft-vocabulary tokens (the
soft labels) and whether the target's argmax over the *whole* vocabulary is a draft token
(`in_draft`: a position whose argmax the draft cannot propose is not trained on; loss.py).
The second is what makes the teacher expensive: a [T, H] x [H, V] GEMM for an argmax. On the
H200 profile (16,384 tokens, H 4096, V 151,936: 20.4 TFLOP) the teacher phase took 40.1 ms
of the trainer's 468.8 ms step, its argmax 3.3 ms of that.

`draft.teacher_argmax` picks how `in_draft` is computed:

* exact: full-vocabulary logits in the head's dtype, `chunk_tokens` rows at a time, their
  argmax, and the draft columns copied out (`target_distribution`, the reference).
* fp8: the draft rows of the head (a [Vd, H] copy in its dtype) give the soft labels
  exactly, in one GEMM with no column copy afterwards. The other rows ([V - Vd, H]) are
  stored once in FP8 (e4m3, a scale per row); a row-scaled FP8 GEMM gives their logits, of
  which only each row's maximum is kept. `in_draft` = (max draft logit >= max other
  logit). FP8's rounding can flip that comparison only where the two maxima are within its
  error of each other (a near-tie between a draft token and another token), so it changes
  which positions train there and nowhere else; the soft labels do not change. How near:
  FP8's logit error is about 0.04 * sqrt(sum_i (w_i h_i)^2), ~0.3 logits on a head whose
  logits spread by 3 (2-3% of rows flipped on such a random head; a trained head's sharper
  maxima flip fewer). An exact tie counts as in the draft (the exact path takes the lower
  token id). Memory: the two row sets add ~0.7 GiB next to the bf16 head at Qwen3-8B's
  shape. Needs `torch._scaled_mm` with row-wise scales (CUDA sm89+, or CPU in recent
  torch): checked when the head is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.config import ConfigError
from colocate.draft.kernels import upcast

LOGIT_CHUNK_TOKENS = 2048
"""Rows per chunk of full-vocabulary logits ([chunk, V] is what exists at a time): the
teacher's here, DFlash's loss (dflash_loss.py), and the GEMM shapes gemm_check.py checks."""

FP8_MAX = 448.0  # the largest float8_e4m3fn value
FP8_ALIGN = 16  # _scaled_mm wants its dimensions in multiples of 16


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


def draft_mask(num_vocab: int, draft_ids: torch.Tensor) -> torch.Tensor:
    """[V] bool: True at the draft vocabulary's target ids."""
    is_draft_V = torch.zeros(num_vocab, dtype=torch.bool, device=draft_ids.device)
    is_draft_V[draft_ids] = True
    return is_draft_V


def _distribution(logits_TV: torch.Tensor, in_draft: torch.Tensor) -> TargetDistribution:
    return TargetDistribution(logits=logits_TV, lse=torch.logsumexp(upcast(logits_TV), dim=-1),
                              in_draft=in_draft, top=logits_TV.argmax(-1))


@torch.no_grad()
def target_distribution(last_hidden_TH: torch.Tensor, lm_head_weight_VH: torch.Tensor,
                        draft_ids: torch.Tensor,
                        chunk_tokens: int = LOGIT_CHUNK_TOKENS) -> TargetDistribution:
    """Frozen target head on the final-norm hidden states, softmax over the draft vocabulary.

    Full-vocab logits exist for `chunk_tokens` rows at a time only ([chunk, V] is the memory
    peak): they are needed for the argmax that decides `in_draft`.
    """
    num_tokens = last_hidden_TH.shape[0]
    device = last_hidden_TH.device
    is_draft_V = draft_mask(lm_head_weight_VH.shape[0], draft_ids.to(device))
    logits_TV = torch.empty(num_tokens, draft_ids.numel(), dtype=lm_head_weight_VH.dtype,
                            device=device)
    in_draft = torch.empty(num_tokens, dtype=torch.bool, device=device)
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        full_CV = last_hidden_TH[start:end].to(lm_head_weight_VH.dtype) @ lm_head_weight_VH.T
        in_draft[start:end] = is_draft_V[full_CV.argmax(-1)]
        torch.index_select(full_CV, 1, draft_ids, out=logits_TV[start:end])
    return _distribution(logits_TV, in_draft)


def fp8_rows(x_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8: e4m3 values and the float32 [N, 1] scales with x ~= values * scales."""
    scale_N1 = upcast(x_NK).abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    # The clamp keeps a row maximum that rounds a hair above 448 from becoming NaN.
    values = (x_NK.float() / scale_N1).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale_N1


class Fp8ArgmaxTeacher:
    """`draft.teacher_argmax=fp8` (module docstring): exact draft-vocabulary logits, and the
    other tokens' maximum from a row-scaled FP8 GEMM. Built once per run from the frozen head."""

    def __init__(self, lm_head_weight_VH: torch.Tensor, draft_ids: torch.Tensor,
                 chunk_tokens: int = LOGIT_CHUNK_TOKENS):
        vocab, hidden = lm_head_weight_VH.shape
        if hidden % FP8_ALIGN:
            raise ConfigError(f"draft.teacher_argmax: fp8 needs the target's hidden size to be a "
                             f"multiple of {FP8_ALIGN} (got {hidden}); use exact")
        other_ids = (~draft_mask(vocab, draft_ids.to(lm_head_weight_VH.device))
                     ).nonzero().flatten()
        self.chunk_tokens = chunk_tokens
        self.draft_VdH = lm_head_weight_VH[draft_ids].contiguous()
        self.dtype = lm_head_weight_VH.dtype
        if other_ids.numel() == 0:  # the draft vocabulary is the whole vocabulary
            self.other_fp8_VoH = self.other_scale_1Vo = None
            return
        # Pad the other rows to a multiple of 16 with copies of the first: a repeated row
        # cannot change a maximum.
        pad = -other_ids.numel() % FP8_ALIGN
        other_ids = torch.cat([other_ids, other_ids[:1].expand(pad)])
        # In blocks of rows: fp8_rows makes a float32 copy ([V, H] would be 2.5 GB at 150k x 4k).
        blocks = [fp8_rows(lm_head_weight_VH[ids]) for ids in other_ids.split(16384)]
        self.other_fp8_VoH = torch.cat([values for values, _ in blocks])
        self.other_scale_1Vo = torch.cat([scales for _, scales in blocks]).T.contiguous()
        self.check_supported()

    def check_supported(self) -> None:
        """Run the FP8 GEMM once on 16 rows: a device or torch without row-scaled FP8 matmul
        fails here, at start-up, with the key to change, not in the first step."""
        probe = self.draft_VdH.new_zeros(FP8_ALIGN, self.draft_VdH.shape[1])
        try:
            self.other_max(probe)
        except (RuntimeError, NotImplementedError) as e:
            raise ConfigError(
                f"draft.teacher_argmax: fp8 needs row-scaled FP8 matmul (torch._scaled_mm; CUDA "
                f"sm89+ or a recent CPU torch), which this device/torch lacks ({e}); use exact"
            ) from e

    def other_max(self, hidden_CH: torch.Tensor) -> torch.Tensor:
        """[C] float32: each row's largest logit over the non-draft tokens (FP8 GEMM)."""
        num_rows = hidden_CH.shape[0]
        pad = -num_rows % FP8_ALIGN  # zero rows: the GEMM's row count in multiples of 16 too
        if pad:
            hidden_CH = torch.cat([hidden_CH, hidden_CH.new_zeros(pad, hidden_CH.shape[1])])
        values, scales = fp8_rows(hidden_CH)
        logits_CVo = torch._scaled_mm(values, self.other_fp8_VoH.T, scale_a=scales,
                                      scale_b=self.other_scale_1Vo, out_dtype=torch.bfloat16)
        return logits_CVo[:num_rows].amax(dim=-1).float()

    def __call__(self, last_hidden_TH: torch.Tensor) -> TargetDistribution:
        num_tokens = last_hidden_TH.shape[0]
        hidden_TH = last_hidden_TH.to(self.dtype)
        # Filled in place below, chunk by chunk; all True when every token is a draft token.
        in_draft = torch.ones(num_tokens, dtype=torch.bool, device=hidden_TH.device)
        target = _distribution(hidden_TH @ self.draft_VdH.T, in_draft)
        if self.other_fp8_VoH is None:
            return target
        # The draft maximum is the logit at `top`: a gather, not another pass over [T, Vd].
        draft_max_T = target.logits.gather(1, target.top[:, None]).squeeze(1).float()
        for start in range(0, num_tokens, self.chunk_tokens):
            end = min(start + self.chunk_tokens, num_tokens)
            in_draft[start:end] = draft_max_T[start:end] >= self.other_max(hidden_TH[start:end])
        return target


def teacher_for(mode: str, lm_head_weight_VH: torch.Tensor, draft_ids: torch.Tensor):
    """The teacher `draft.teacher_argmax` names: a callable last_hidden [T, H] ->
    TargetDistribution."""
    if mode == "fp8":
        return Fp8ArgmaxTeacher(lm_head_weight_VH, draft_ids)
    return lambda last_hidden_TH: target_distribution(last_hidden_TH, lm_head_weight_VH,
                                                      draft_ids)
