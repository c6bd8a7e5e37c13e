"""`kernels.merge_diagonal` in Triton, forward and backward: each program takes BLOCK_R
(token, query head) rows of one KV head and walks the n diagonal keys one at a time.

Why a hand-written kernel: the merge moves about 0.8 GB per 16k-token unroll step, 0.2 ms at
an H200's bandwidth, but torch.compile made it batched [4, 128] x [128, n] GEMMs (einsums)
or reductions over 4 to 6 elements spread over a million tiny programs: 14-22 ms per
unroll, as much as dropping the diagonal key blocks saved in flex
(docs/gpu-logs/profile-h200/flex-lse-merge-2026-12-02/). These kernels take about 11 ms per
unroll (forward ~2.3, backward 9.0: docs/gpu-logs/profile-h200/diag-merge-triton-2026-12-02/).

Maths (per token and query head; z_0 = lse, z_i = s_i = scale q . k_i, u_0 = out,
u_i = v_i, pi = softmax(z), out' = sum_j pi_j u_j; g = d loss / d out'):

    d z_j = pi_j (u_j . g - out' . g)
    d out = pi_0 g,   d v_i = sum over the G heads of pi_i g,
    d q = scale sum_i d s_i k_i,   d k_i = scale sum over the G heads of d s_i q

`backward_reference` writes the same formulas in PyTorch; the CPU tests hold it to autograd
through `kernels.merge_diagonal`, and tests/gpu/test_diag_merge.py holds the kernels to both.
"""

from __future__ import annotations

import os

import torch

from colocate.draft import kernels
from colocate.draft.kernels import upcast

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the PyTorch path (kernels.merge_diagonal) is used
    triton = None


def backward_reference(grad_THD, out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale):
    """Gradients of `kernels.merge_diagonal` by the formulas above, in float32.
    Returns (d out, d lse, d q, d k, d v) in the inputs' shapes."""
    num_tokens, num_heads, head_dim = q_THD.shape
    num_kv_heads = k_TKnD.shape[1]
    shape = (num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    q, out, g = (upcast(x).reshape(shape) for x in (q_THD, out_THD, grad_THD))
    k, v = upcast(k_TKnD), upcast(v_TKnD)
    lse = upcast(lse_TH).reshape(shape[:3])
    scores = torch.einsum("tkgd,tknd->tkgn", q, k) * scale
    total = torch.logsumexp(torch.cat([lse[..., None], scores], -1), -1)
    w0, probs = torch.exp(lse - total), torch.exp(scores - total[..., None])
    merged = w0[..., None] * out + torch.einsum("tkgn,tknd->tkgd", probs, v)
    merged_dot_g = (merged * g).sum(-1)
    grad_lse = w0 * ((out - merged) * g).sum(-1)
    grad_scores = probs * (torch.einsum("tknd,tkgd->tkgn", v, g) - merged_dot_g[..., None])
    grad_q = scale * torch.einsum("tkgn,tknd->tkgd", grad_scores, k)
    grad_k = scale * torch.einsum("tkgn,tkgd->tknd", grad_scores, q)
    grad_v = torch.einsum("tkgn,tkgd->tknd", probs, g)
    return (
        (w0[..., None] * g).reshape(out_THD.shape).to(out_THD.dtype),
        grad_lse.reshape(lse_TH.shape).to(lse_TH.dtype),
        grad_q.reshape(q_THD.shape).to(q_THD.dtype),
        grad_k.to(k_TKnD.dtype), grad_v.to(v_TKnD.dtype),
    )


def usable(q_THD: torch.Tensor, k_TKnD: torch.Tensor) -> bool:
    """The Triton path: CUDA, Triton, a power-of-two head dim, at most 16 query heads per KV
    head (a program's 16 rows hold at least one token)."""
    head_dim = q_THD.shape[-1]
    group = q_THD.shape[1] // k_TKnD.shape[1]
    return (triton is not None and kernels.triton_available(q_THD.device)
            and head_dim & (head_dim - 1) == 0 and k_TKnD.shape[2] >= 1 and group <= 16)


def merge_diagonal(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale: float) -> torch.Tensor:
    """`kernels.merge_diagonal` on the Triton kernels when `usable`, else in PyTorch:
    compiled where Triton runs (eager, its broadcasts would materialise [T, Hq, n, D] in
    float32, gigabytes at 16k tokens), eager on CPU."""
    if not usable(q_THD, k_TKnD):
        merge = kernels.pick(kernels.merge_diagonal, "auto", q_THD.device)
        return merge(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale)
    return _MergeDiagonal.apply(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale)


if triton is not None:

    # Rows are (token, query head) pairs: BLOCK_R // GP tokens of one KV head per program.
    # One token per program (the first version) ran 131k programs of 4 x 128 values each
    # and took 0.9 ms forward, 1.5 ms backward per 16k-token step on an H200, ~10x what the
    # bytes need. The diagonal keys are walked one at a time (N is small), so no
    # [rows, N, D] temporary exists.
    _CONFIGS = [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in ((16, 4), (32, 4), (64, 8))]
    if os.environ.get("TRITON_INTERPRET") == "1":
        _CONFIGS = _CONFIGS[:1]  # one config: the autotuner does not time it

    @triton.jit
    def _rows(t0, kv, T, G: tl.constexpr, GP: tl.constexpr, BLOCK_R: tl.constexpr):
        """(token [R], query head [R], row mask [R]) of this program's rows."""
        r = tl.arange(0, BLOCK_R)
        t = t0 + r // GP
        g = r % GP
        return t, kv * G + g, (g < G) & (t < T)

    @triton.jit
    def _load(ptr, t, h, mask, s_t, s_h, s_d, D: tl.constexpr):
        """[R, D] float32 rows (token t, head h) of a [T, H, D] tensor; zeros where masked."""
        d = tl.arange(0, D)
        offs = t[:, None] * s_t + h[:, None] * s_h + d[None, :] * s_d
        return tl.load(ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _softmax_pass(q, out, lse, k_ptr, v_ptr, t, kv, mask, scale, sk_t, sk_h, sk_n, sk_d,
                      sv_t, sv_h, sv_n, sv_d, N: tl.constexpr, D: tl.constexpr):
        """Online softmax over (lse, s_1..s_N): (merged [R, D], total log-sum-exp [R])."""
        kv_rows = t * 0 + kv
        m = lse
        denom = tl.full(lse.shape, 1.0, tl.float32)
        acc = out
        for n in tl.static_range(N):
            k = _load(k_ptr + n * sk_n, t, kv_rows, mask, sk_t, sk_h, sk_d, D)
            v = _load(v_ptr + n * sv_n, t, kv_rows, mask, sv_t, sv_h, sv_d, D)
            s = tl.sum(q * k, axis=1) * scale
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            denom = denom * alpha + e
            acc = acc * alpha[:, None] + e[:, None] * v
            m = m_new
        return acc / denom[:, None], m + tl.log(denom)

    @triton.autotune(configs=_CONFIGS, key=["N", "G", "D"])
    @triton.jit
    def _forward_kernel(out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, res_ptr, scale, T,
                        so_t, so_h, so_d, sl_t, sl_h, sq_t, sq_h, sq_d,
                        sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d, sr_t, sr_h, sr_d,
                        G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                        BLOCK_R: tl.constexpr):
        kv = tl.program_id(1)
        t, h, mask = _rows(tl.program_id(0) * (BLOCK_R // GP), kv, T, G, GP, BLOCK_R)
        q = _load(q_ptr, t, h, mask, sq_t, sq_h, sq_d, D)
        out = _load(out_ptr, t, h, mask, so_t, so_h, so_d, D)
        lse = tl.load(lse_ptr + t * sl_t + h * sl_h, mask=mask, other=0.0).to(tl.float32)
        merged, _ = _softmax_pass(q, out, lse, k_ptr, v_ptr, t, kv, mask, scale,
                                  sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d, N, D)
        d = tl.arange(0, D)
        offs = t[:, None] * sr_t + h[:, None] * sr_h + d[None, :] * sr_d
        tl.store(res_ptr + offs, merged.to(res_ptr.dtype.element_ty), mask=mask[:, None])

    @triton.autotune(configs=_CONFIGS, key=["N", "G", "D"])
    @triton.jit
    def _backward_kernel(grad_ptr, out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr,
                         d_out_ptr, d_lse_ptr, d_q_ptr, d_k_ptr, d_v_ptr, scale, T, num_kv,
                         sg_t, sg_h, sg_d, so_t, so_h, so_d, sl_t, sl_h, sq_t, sq_h, sq_d,
                         sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d,
                         G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                         BLOCK_R: tl.constexpr):
        # The gradients are written contiguous: [T, Hq, D], [T, Hq], [T, Hkv, N, D].
        TOKENS: tl.constexpr = BLOCK_R // GP
        kv = tl.program_id(1)
        t0 = tl.program_id(0) * TOKENS
        t, h, mask = _rows(t0, kv, T, G, GP, BLOCK_R)
        grad = _load(grad_ptr, t, h, mask, sg_t, sg_h, sg_d, D)
        q = _load(q_ptr, t, h, mask, sq_t, sq_h, sq_d, D)
        out = _load(out_ptr, t, h, mask, so_t, so_h, so_d, D)
        lse = tl.load(lse_ptr + t * sl_t + h * sl_h, mask=mask, other=0.0).to(tl.float32)
        merged, total = _softmax_pass(q, out, lse, k_ptr, v_ptr, t, kv, mask, scale,
                                      sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d, N, D)
        merged_dot_g = tl.sum(merged * grad, axis=1)
        w0 = tl.exp(lse - total)
        # (out - merged) . g, not out . g - merged . g: two sums of ~10 would cancel.
        d_lse = tl.where(mask, w0 * tl.sum((out - merged) * grad, axis=1), 0.0)
        d = tl.arange(0, D)
        d_q = tl.zeros(q.shape, tl.float32)
        tok = t0 + tl.arange(0, TOKENS)
        tok_mask = (tok < T)[:, None]
        kv_rows = t * 0 + kv
        for n in tl.static_range(N):
            k = _load(k_ptr + n * sk_n, t, kv_rows, mask, sk_t, sk_h, sk_d, D)
            v = _load(v_ptr + n * sv_n, t, kv_rows, mask, sv_t, sv_h, sv_d, D)
            p = tl.where(mask, tl.exp(tl.sum(q * k, axis=1) * scale - total), 0.0)
            d_s = p * (tl.sum(v * grad, axis=1) - merged_dot_g)
            d_q += scale * d_s[:, None] * k
            # Per token: the sums over its G query heads (rows past G are zero).
            d_k = scale * tl.sum(tl.reshape(d_s[:, None] * q, (TOKENS, GP, D)), axis=1)
            d_v = tl.sum(tl.reshape(p[:, None] * grad, (TOKENS, GP, D)), axis=1)
            diag = ((tok * num_kv + kv) * N + n)[:, None] * D + d[None, :]
            tl.store(d_k_ptr + diag, d_k.to(d_k_ptr.dtype.element_ty), mask=tok_mask)
            tl.store(d_v_ptr + diag, d_v.to(d_v_ptr.dtype.element_ty), mask=tok_mask)
        rows = t * (num_kv * G) + h
        tl.store(d_out_ptr + rows[:, None] * D + d[None, :],
                 (w0[:, None] * grad).to(d_out_ptr.dtype.element_ty), mask=mask[:, None])
        tl.store(d_lse_ptr + rows, d_lse.to(d_lse_ptr.dtype.element_ty), mask=mask)
        tl.store(d_q_ptr + rows[:, None] * D + d[None, :],
                 d_q.to(d_q_ptr.dtype.element_ty), mask=mask[:, None])


def _sizes(q_THD, k_TKnD):
    num_tokens, num_heads, head_dim = q_THD.shape
    num_kv_heads, num_diag = k_TKnD.shape[1], k_TKnD.shape[2]
    group = num_heads // num_kv_heads
    sizes = dict(G=group, GP=triton.next_power_of_2(group), N=num_diag, D=head_dim)

    def grid(meta):
        return triton.cdiv(num_tokens, meta["BLOCK_R"] // sizes["GP"]), num_kv_heads
    return sizes, grid


class _MergeDiagonal(torch.autograd.Function):

    @staticmethod
    def forward(ctx, out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale):
        sizes, grid = _sizes(q_THD, k_TKnD)
        merged = torch.empty(q_THD.shape, dtype=q_THD.dtype, device=q_THD.device)
        _forward_kernel[grid](out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, merged, scale,
                              q_THD.shape[0],
                              *out_THD.stride(), *lse_TH.stride(), *q_THD.stride(),
                              *k_TKnD.stride(), *v_TKnD.stride(), *merged.stride(), **sizes)
        ctx.save_for_backward(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD)
        ctx.scale = scale
        return merged

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_THD):
        out_THD, lse_TH, q_THD, k_TKnD, v_TKnD = ctx.saved_tensors
        sizes, grid = _sizes(q_THD, k_TKnD)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device)
                 for x in (out_THD, lse_TH, q_THD, k_TKnD, v_TKnD)]
        _backward_kernel[grid](grad_THD, out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, *grads,
                               ctx.scale, q_THD.shape[0], k_TKnD.shape[1], *grad_THD.stride(), *out_THD.stride(),
                               *lse_TH.stride(), *q_THD.stride(), *k_TKnD.stride(),
                               *v_TKnD.stride(), **sizes)
        return (*grads, None)
