"""`kernels.soft_ce_rows` as one Triton program per row: loss, logits-gradient and argmax.

Why a hand-written kernel: torch.compile fuses the soft cross-entropy into one reduction
kernel, 2.6 ms per unroll step on a 16k x 32k bf16 block on an H200 (18.4 ms per
7-step unroll, docs/gpu-logs/profile-h200/diag-merge-triton-2026-12-02/). The bytes it must
move (the logits and the teacher's rows read, the gradient written: about 3.1 GB) take
0.65 ms at the H200's bandwidth. Here a program walks its row twice in blocks: pass 1 keeps
an online max and sum for the log-sum-exp, the argmax, and the teacher's sum(p) and
sum(p * z); pass 2 writes the gradient. The second pass re-reads a 128 KiB row pair that
the first just read, mostly from L2.

Measured on an H200 (`python tests/gpu/bench_soft_ce.py`, 16k x 32k bf16, 2026-12-02):
eager 20.2 ms, compiled 2.50 ms, this kernel 1.43 ms per call (2.2 TB/s), so about 7.5 ms
less per 7-step unroll, ~1.6% of the trainer's 455 ms step; not yet timed in a colocated
bench (a gain that size is inside its call-to-call spread).

Same maths as `kernels.soft_ce_rows` (its docstring), which is the reference in
tests/unit/test_soft_ce_interpreted.py (Triton's CPU interpreter) and
tests/gpu/test_soft_ce_triton.py.
"""

from __future__ import annotations

import torch

from colocate.draft import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the PyTorch path (kernels.soft_ce_rows) is used
    triton = None

BLOCK_V = 2048


def usable(logits_CV: torch.Tensor) -> bool:
    """The Triton path: CUDA with Triton, a contiguous float32/bf16/fp16 logits block."""
    return (triton is not None and kernels.triton_available(logits_CV.device)
            and logits_CV.is_contiguous() and logits_CV.dtype in (torch.float32,
                                                                   torch.bfloat16,
                                                                   torch.float16))


def soft_ce_rows(logits_CV: torch.Tensor, teacher_logits_NV: torch.Tensor,
                 teacher_lse_N: torch.Tensor, src_C: torch.Tensor, weight_C: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.soft_ce_rows` on the Triton kernel: (loss float32 scalar, grad in the logits'
    dtype, [C] int64 argmax). The teacher rows must be contiguous in their last dim."""
    num_rows, vocab = logits_CV.shape
    assert teacher_logits_NV.shape[1] == vocab and teacher_logits_NV.stride(1) == 1
    grad = torch.empty_like(logits_CV)
    loss_C = torch.empty(num_rows, dtype=torch.float32, device=logits_CV.device)
    top_C = torch.empty(num_rows, dtype=torch.int64, device=logits_CV.device)
    if num_rows:
        _row_kernel[(num_rows,)](
            logits_CV, teacher_logits_NV, teacher_lse_N.float().contiguous(),
            src_C.contiguous(), weight_C.float().contiguous(), grad, loss_C, top_C, vocab,
            teacher_logits_NV.stride(0), BLOCK_V=BLOCK_V, num_warps=8)
    return loss_C.sum(), grad, top_C


if triton is not None:

    @triton.jit
    def _row_kernel(z_ptr, t_ptr, t_lse_ptr, src_ptr, w_ptr, grad_ptr, loss_ptr, top_ptr, V,
                    t_stride, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = tl.load(src_ptr + row)
        t_lse = tl.load(t_lse_ptr + src)
        w = tl.load(w_ptr + row)
        z_row = z_ptr + row * V
        t_row = t_ptr + src * t_stride
        cols = tl.arange(0, BLOCK_V)
        # Pass 1. m/s: online log-sum-exp of z; best/best_i: the first maximum (as
        # torch.argmax); p_sum, pz: sum(p) and sum(p * z) with p = exp(t - t_lse).
        m = float("-inf")
        s = 0.0
        best = float("-inf")
        best_i = 0
        p_sum = 0.0
        pz = 0.0
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            block_max = tl.max(z, axis=0)
            block_i = tl.argmax(z, axis=0)
            # Strict: an equal maximum in a later block keeps the earlier index.
            best_i = tl.where(block_max > best, start + block_i, best_i)
            best = tl.maximum(best, block_max)
            m_new = tl.maximum(m, block_max)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            p = tl.exp(t - t_lse)
            p_sum += tl.sum(p, axis=0)
            pz += tl.sum(tl.where(mask, p * z, 0.0), axis=0)
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, w * (p_sum * lse - pz))
        tl.store(top_ptr + row, best_i.to(tl.int64))
        # Pass 2: d loss / d z = w * (softmax(z) * sum(p) - p).
        g_row = grad_ptr + row * V
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            g = w * (tl.exp(z - lse) * p_sum - tl.exp(t - t_lse))
            tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
