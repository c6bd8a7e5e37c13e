"""`kernels.merge_diagonal` as one Triton program per (token, KV head), forward and backward.

Why a hand-written kernel: the merge moves about 0.8 GB per 16k-token unroll step, 0.2 ms at
an H200's bandwidth, but torch.compile made it batched [4, 128] x [128, n] GEMMs (einsums)
or reductions over 4 to 6 elements spread over a million tiny programs: 14-22 ms per
unroll, as much as dropping the diagonal key blocks saved in flex
(docs/gpu-logs/profile-h200/flex-lse-merge-2026-12-02/). One program here holds a token's
G = Hq / Hkv query heads, its n diagonal keys and values, and does all the small sums in
registers.

Maths (per token and query head; z_0 = lse, z_i = s_i = scale q . k_i, u_0 = out,
u_i = v_i, pi = softmax(z), out' = sum_j pi_j u_j; g = d loss / d out'):

    d z_j = pi_j (u_j . g - out' . g)
    d out = pi_0 g,   d v_i = sum over the G heads of pi_i g,
    d q = scale sum_i d s_i k_i,   d k_i = scale sum over the G heads of d s_i q

`backward_reference` writes the same formulas in PyTorch; the CPU tests hold it to autograd
through `kernels.merge_diagonal`, and tests/gpu/test_diag_merge.py holds the kernels to both.
"""

from __future__ import annotations

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
    grad_lse = w0 * ((out * g).sum(-1) - merged_dot_g)
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
    """The Triton path: CUDA, Triton, a power-of-two head dim."""
    head_dim = q_THD.shape[-1]
    return (triton is not None and kernels.triton_available(q_THD.device)
            and head_dim & (head_dim - 1) == 0 and k_TKnD.shape[2] >= 1)


def merge_diagonal(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale: float) -> torch.Tensor:
    """`kernels.merge_diagonal` on the Triton kernels when `usable`, else in PyTorch."""
    if not usable(q_THD, k_TKnD):
        return kernels.merge_diagonal(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale)
    return _MergeDiagonal.apply(out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale)


if triton is not None:

    @triton.jit
    def _load_rows(ptr, t, kv, stride_t, stride_h, stride_d, G: tl.constexpr,
                   GP: tl.constexpr, D: tl.constexpr):
        """[GP, D] float32: the G query heads of KV head kv at token t (zeros past G)."""
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        offs = t * stride_t + (kv * G + g)[:, None] * stride_h + d[None, :] * stride_d
        return tl.load(ptr + offs, mask=(g < G)[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _load_diag(ptr, t, kv, s_t, s_h, s_n, s_d, N: tl.constexpr, NP: tl.constexpr,
                   D: tl.constexpr):
        """[NP, D] float32: the N diagonal keys (or values) of KV head kv at token t."""
        n = tl.arange(0, NP)
        d = tl.arange(0, D)
        offs = t * s_t + kv * s_h + n[:, None] * s_n + d[None, :] * s_d
        return tl.load(ptr + offs, mask=(n < N)[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _weights(q, k, lse, scale, N: tl.constexpr, NP: tl.constexpr):
        """(w0 [GP], probs [GP, NP], total [GP]): the softmax over (lse, scores)."""
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        valid = (tl.arange(0, NP) < N)[None, :]
        scores = tl.where(valid, scores, float("-inf"))
        m = tl.maximum(lse, tl.max(scores, axis=1))
        e0 = tl.exp(lse - m)
        es = tl.exp(scores - m[:, None])
        denom = e0 + tl.sum(es, axis=1)
        return e0 / denom, es / denom[:, None], m + tl.log(denom)

    @triton.jit
    def _forward_kernel(out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, res_ptr, scale,
                        so_t, so_h, so_d, sl_t, sl_h, sq_t, sq_h, sq_d,
                        sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d, sr_t, sr_h, sr_d,
                        G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                        NP: tl.constexpr, D: tl.constexpr):
        t = tl.program_id(0)
        kv = tl.program_id(1)
        g = tl.arange(0, GP)
        q = _load_rows(q_ptr, t, kv, sq_t, sq_h, sq_d, G, GP, D)
        out = _load_rows(out_ptr, t, kv, so_t, so_h, so_d, G, GP, D)
        lse = tl.load(lse_ptr + t * sl_t + (kv * G + g) * sl_h, mask=g < G, other=0.0)
        k = _load_diag(k_ptr, t, kv, sk_t, sk_h, sk_n, sk_d, N, NP, D)
        v = _load_diag(v_ptr, t, kv, sv_t, sv_h, sv_n, sv_d, N, NP, D)
        w0, probs, _ = _weights(q, k, lse.to(tl.float32), scale, N, NP)
        merged = w0[:, None] * out + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        d = tl.arange(0, D)
        offs = t * sr_t + (kv * G + g)[:, None] * sr_h + d[None, :] * sr_d
        tl.store(res_ptr + offs, merged.to(res_ptr.dtype.element_ty), mask=(g < G)[:, None])

    @triton.jit
    def _backward_kernel(grad_ptr, out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr,
                         d_out_ptr, d_lse_ptr, d_q_ptr, d_k_ptr, d_v_ptr, scale,
                         sg_t, sg_h, sg_d, so_t, so_h, so_d, sl_t, sl_h, sq_t, sq_h, sq_d,
                         sk_t, sk_h, sk_n, sk_d, sv_t, sv_h, sv_n, sv_d,
                         G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                         NP: tl.constexpr, D: tl.constexpr):
        # The gradients are written contiguous: [T, Hq, D], [T, Hq], [T, Hkv, N, D].
        t = tl.program_id(0)
        kv = tl.program_id(1)
        num_kv = tl.num_programs(1)
        g = tl.arange(0, GP)
        n = tl.arange(0, NP)
        d = tl.arange(0, D)
        grad = _load_rows(grad_ptr, t, kv, sg_t, sg_h, sg_d, G, GP, D)
        q = _load_rows(q_ptr, t, kv, sq_t, sq_h, sq_d, G, GP, D)
        out = _load_rows(out_ptr, t, kv, so_t, so_h, so_d, G, GP, D)
        lse = tl.load(lse_ptr + t * sl_t + (kv * G + g) * sl_h, mask=g < G, other=0.0)
        k = _load_diag(k_ptr, t, kv, sk_t, sk_h, sk_n, sk_d, N, NP, D)
        v = _load_diag(v_ptr, t, kv, sv_t, sv_h, sv_n, sv_d, N, NP, D)
        w0, probs, _ = _weights(q, k, lse.to(tl.float32), scale, N, NP)
        merged = w0[:, None] * out + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        merged_dot_g = tl.sum(merged * grad, axis=1)
        d_lse = w0 * (tl.sum(out * grad, axis=1) - merged_dot_g)
        v_dot_g = tl.sum(v[None, :, :] * grad[:, None, :], axis=2)
        d_scores = probs * (v_dot_g - merged_dot_g[:, None])
        d_q = scale * tl.sum(d_scores[:, :, None] * k[None, :, :], axis=1)
        d_k = scale * tl.sum(d_scores[:, :, None] * q[:, None, :], axis=0)
        d_v = tl.sum(probs[:, :, None] * grad[:, None, :], axis=0)
        rows = (t * num_kv * G + kv * G + g)
        row_mask = (g < G)[:, None]
        tl.store(d_out_ptr + rows[:, None] * D + d[None, :],
                 (w0[:, None] * grad).to(d_out_ptr.dtype.element_ty), mask=row_mask)
        tl.store(d_lse_ptr + rows, d_lse.to(d_lse_ptr.dtype.element_ty), mask=g < G)
        tl.store(d_q_ptr + rows[:, None] * D + d[None, :],
                 d_q.to(d_q_ptr.dtype.element_ty), mask=row_mask)
        diag = ((t * num_kv + kv) * N + n)[:, None] * D + d[None, :]
        diag_mask = (n < N)[:, None]
        tl.store(d_k_ptr + diag, d_k.to(d_k_ptr.dtype.element_ty), mask=diag_mask)
        tl.store(d_v_ptr + diag, d_v.to(d_v_ptr.dtype.element_ty), mask=diag_mask)


def _sizes(q_THD, k_TKnD):
    num_tokens, num_heads, head_dim = q_THD.shape
    num_kv_heads, num_diag = k_TKnD.shape[1], k_TKnD.shape[2]
    group = num_heads // num_kv_heads
    return dict(G=group, GP=max(triton.next_power_of_2(group), 2), N=num_diag,
                NP=max(triton.next_power_of_2(num_diag), 2), D=head_dim), (num_tokens, num_kv_heads)


class _MergeDiagonal(torch.autograd.Function):

    @staticmethod
    def forward(ctx, out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, scale):
        sizes, grid = _sizes(q_THD, k_TKnD)
        merged = torch.empty(q_THD.shape, dtype=q_THD.dtype, device=q_THD.device)
        _forward_kernel[grid](out_THD, lse_TH, q_THD, k_TKnD, v_TKnD, merged, scale,
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
                               ctx.scale, *grad_THD.stride(), *out_THD.stride(),
                               *lse_TH.stride(), *q_THD.stride(), *k_TKnD.stride(),
                               *v_TKnD.stride(), **sizes)
        return (*grads, None)
