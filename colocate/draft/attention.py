"""Attention math for the Eagle3 test-time-training (TTT) unroll, on packed sequences.

Layout: T tokens of S sequences packed back to back (no batch dimension); `seq_bounds`
gives each sequence's [start, end) on the host. At unroll step k the query at index t
attends to

* the step-0 keys/values of its own sequence at indices s <= t (causal), and
* the keys/values that steps 1..k produced at the same index t (the "diagonal": in
  serving, those are the draft's own earlier guesses in this chain),

with one softmax over the union. This is the mask of current SpecForge (flex path:
`q_idx >= kv_idx` over step 0, plus `(kv_idx - q_idx) % Q_LEN == 0` over later steps).

The causal part is computed per sequence (no dense [T, T] mask across sequences); the
diagonal part is an elementwise q.k per index. Scores and softmax are float32; the matmuls
run in the input dtype.

This loop is the reference. It keeps no [H, L, L] scores for backward (each sequence is
recomputed under activation checkpointing), at the price of a second forward per sequence.
`colocate.draft.flex` computes the same attention as one block-sparse flex_attention call
per step (`draft.attention`: auto/loop/flex); tests/unit/test_draft_flex.py holds the two
to the same outputs and gradients.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from colocate.draft.kernels import upcast


def seq_bounds_from_lens(seq_lens: torch.Tensor | list[int]) -> list[tuple[int, int]]:
    """Host-side [start, end) per sequence. Pass a CPU tensor or list: on a CUDA tensor the
    `.tolist()` here would be a device-to-host sync."""
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    bounds, start = [], 0
    for n in lens:
        bounds.append((start, start + int(n)))
        start += int(n)
    return bounds


def ttt_attention(q_THD: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  seq_bounds: list[tuple[int, int]], scale: float) -> torch.Tensor:
    """Attention of step k = len(keys) - 1 of the TTT unroll.

    q_THD: [T, Hq, D] queries of this step (RoPE already applied).
    keys, values: per step 0..k, each [T, Hkv, D]; Hq must be a multiple of Hkv (GQA).
    Returns [T, Hq, D].
    """
    num_tokens, num_heads, head_dim = q_THD.shape
    num_kv_heads = keys[0].shape[1]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, (num_heads, num_kv_heads)
    assert seq_bounds and seq_bounds[-1][1] == num_tokens, "seq_lens must sum to T"
    k0_TKD, v0_TKD = keys[0], values[0]
    num_diag = len(keys) - 1
    # GQA without repeating K/V: query heads are grouped [Hkv, G] next to their KV head.
    q_TKGD = q_THD.view(num_tokens, num_kv_heads, group, head_dim)

    if num_diag:
        diag_k_TKnD = torch.stack(keys[1:], dim=2)  # [T, Hkv, n, D]
        diag_v_TKnD = torch.stack(values[1:], dim=2)
        diag_scores_TKGn = upcast(torch.einsum("tkgd,tknd->tkgn", q_TKGD, diag_k_TKnD)) * scale

    max_len = max(end - start for start, end in seq_bounds)
    # The top-left LxL block of one strict-upper mask is the mask of a length-L sequence.
    future_LL = torch.ones(max_len, max_len, dtype=torch.bool, device=q_THD.device).triu(1)

    causal_out, diag_probs = [], []
    for start, end in seq_bounds:
        length = end - start
        if length == 0:
            continue
        diag = diag_scores_TKGn[start:end].permute(1, 2, 0, 3) if num_diag else None
        args = (q_TKGD[start:end].permute(1, 2, 0, 3), k0_TKD[start:end].permute(1, 2, 0),
                v0_TKD[start:end].permute(1, 0, 2), diag, future_LL[:length, :length], scale)
        if torch.is_grad_enabled() and q_THD.requires_grad:
            # Recompute in backward instead of keeping this sequence's [Hq, L, L] float32
            # scores and probabilities alive until then: at 8k tokens x 7 unroll steps with
            # Qwen3-8B heads they were ~25 GiB, about a third of the attention flops extra.
            out_LKGD, probs_LKGn = checkpoint(_sequence_attention, *args, use_reentrant=False)
        else:
            out_LKGD, probs_LKGn = _sequence_attention(*args)
        causal_out.append(out_LKGD)
        if num_diag:
            diag_probs.append(probs_LKGn)

    out_TKGD = torch.cat(causal_out, dim=0)
    if num_diag:
        probs_TKGn = torch.cat(diag_probs, dim=0).to(diag_v_TKnD.dtype)
        out_TKGD = out_TKGD + torch.einsum("tkgn,tknd->tkgd", probs_TKGn, diag_v_TKnD)
    return out_TKGD.reshape(num_tokens, num_heads, head_dim)


def _sequence_attention(q_KGLD: torch.Tensor, k_KDL: torch.Tensor, v_KLD: torch.Tensor,
                        diag_scores_KGLn: torch.Tensor | None, future_LL: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence: causal step-0 attention plus the diagonal scores in one softmax.

    Returns (causal output [L, Hkv, G, D], diagonal probabilities [L, Hkv, G, n] or None).
    """
    num_kv_heads, group, length, head_dim = q_KGLD.shape
    scores_KGLL = q_KGLD.reshape(num_kv_heads, group * length, head_dim) @ k_KDL
    scores_KGLL = upcast(scores_KGLL.view(num_kv_heads, group, length, length)) * scale
    scores_KGLL = scores_KGLL.masked_fill(future_LL, float("-inf"))
    scores = scores_KGLL if diag_scores_KGLn is None else torch.cat([scores_KGLL,
                                                                      diag_scores_KGLn], -1)
    # One softmax over the union of causal and diagonal keys. The causal part always holds
    # the query's own index (s == t), so no row is fully masked.
    probs = torch.softmax(scores, dim=-1)
    probs_causal = probs[..., :length].to(v_KLD.dtype)
    out_KGLD = probs_causal.reshape(num_kv_heads, group * length, length) @ v_KLD
    out_LKGD = out_KGLD.view(num_kv_heads, group, length, head_dim).permute(2, 0, 1, 3)
    diag_probs = None if diag_scores_KGLn is None else probs[..., length:].permute(2, 0, 1, 3)
    return out_LKGD, diag_probs
