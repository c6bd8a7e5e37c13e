"""The draft's memory-bound maths, run eager or fused by `torch.compile` (`draft.kernels`).

The unroll is mostly matmuls, but between them sit chains of elementwise ops and row
reductions over [T, H] activations and [T, Vd] logits: RMSNorm in float32, RoPE, SiLU * up,
and the soft cross-entropy over the draft vocabulary. Eager PyTorch runs each op as its
own kernel and writes every intermediate to memory (the soft cross-entropy alone makes
about fifteen passes over a float32 [T, Vd] block per unroll step). Compiled, each function
below becomes one or two Triton kernels, forward and backward.

Every function is plain PyTorch, so its eager form is the reference the compiled one is
tested against (tests/unit/test_draft_kernels.py, on the CPU inductor backend).

`draft.kernels`: auto (compiled on CUDA when Triton is usable, eager elsewhere), eager, or
compiled (also on CPU, which needs a C++ compiler; the tests use it). Compiled functions use
automatic dynamic shapes (`dynamic=None`): the first shape compiles static, the first
change of token count recompiles once with it symbolic (micro-steps vary in length).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

KERNEL_MODES = ("auto", "eager", "compiled")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 -> fp32 for softmax/norm math; float64 stays float64 in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def triton_available(device: torch.device) -> bool:
    """Whether compiled kernels can run on `device` (CUDA with Triton)."""
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton
    return has_triton()


def use_compiled(mode: str, device: torch.device) -> bool:
    assert mode in KERNEL_MODES, mode
    return triton_available(device) if mode == "auto" else mode == "compiled"


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=None)


def pick(fn: Callable, mode: str, device: torch.device) -> Callable:
    """`fn` itself, or its compiled form (made once per function, compiled at first call)."""
    if use_compiled(mode, device) and not torch.compiler.is_compiling():
        return _compiled(fn)
    return fn


# --------------------------------------------------------------------------- functions


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, scale in the input dtype (the Llama/sglang convention)."""
    x32 = upcast(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> (cos, sin), each [T, head_dim // 2] float32."""
    freqs_TF = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs_TF.cos(), freqs_TF.sin()


def apply_rope(x_TND: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate-half (neox) RoPE, as Llama and sglang's default `is_neox_style=True` apply it."""
    half = x_TND.shape[-1] // 2
    x = upcast(x_TND)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_TF[:, None, :], sin_TF[:, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x_TND.dtype)


def rope_qk(q_TND: torch.Tensor, k_TND: torch.Tensor, positions: torch.Tensor,
            inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys at `positions` (cos/sin built once for both)."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    return apply_rope(q_TND, cos, sin), apply_rope(k_TND, cos, sin)


def soft_ce_rows(logits_CV: torch.Tensor, teacher_logits_NV: torch.Tensor,
                 teacher_lse_N: torch.Tensor, src_C: torch.Tensor, weight_C: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and logits-gradient of sum_c w_c * -sum_v p[src_c, v] * log_softmax(logits_c)_v,
    and each row's argmax (the draft's greedy token, for the hit statistics: computed in
    the same pass over the logits instead of a separate read of the [C, V] block).

    p = exp(teacher_logits - teacher_lse) is formed here, row by row, from the teacher's
    draft-vocabulary logits (never stored as a float32 [T, Vd] tensor). Per row, with
    z = logits and lse = logsumexp(z):  loss = sum(p) * lse - sum(p * z),
    d loss / d z = softmax(z) * sum(p) - p  (sum(p) is 1 unless the teacher rows are
    renormalised). Returns (loss scalar in float32 or wider, grad in the logits' dtype,
    [C] int64 argmax).
    """
    z = upcast(logits_CV)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(upcast(teacher_logits_NV[src_C]) - teacher_lse_N[src_C, None])
    p_sum = p.sum(-1, keepdim=True)
    w = weight_C[:, None].to(z.dtype)
    loss = (w * (p_sum * lse - (p * z).sum(-1, keepdim=True))).sum()
    grad = w * (torch.exp(z - lse) * p_sum - p)
    return loss, grad.to(logits_CV.dtype), z.argmax(-1)


def scale(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x times a 0-d device tensor, in x's dtype. Eager, a 0-d operand sends the multiply
    to PyTorch's generic (unvectorised) broadcast kernel: 1.3 ms per unroll step on a
    16k x 32k bf16 gradient on an H200; compiled it is one vectorised pass."""
    return x * factor.to(x.dtype)


def merge_diagonal(out_THD: torch.Tensor, lse_TH: torch.Tensor, q_THD: torch.Tensor,
                   k_TKnD: torch.Tensor, v_TKnD: torch.Tensor, scale: float) -> torch.Tensor:
    """Add the TTT unroll's diagonal keys to a causal attention output (colocate/draft/flex.py).

    out_THD [T, Hq, D] and lse_TH [T, Hq]: causal attention and its log-sum-exp over the
    step-0 keys; k_TKnD, v_TKnD [T, Hkv, n, D]: the n keys/values that steps 1..n made at
    each index (GQA: query head h uses KV head h // (Hq / Hkv)). Returns [T, Hq, D], the
    attention over the union with one softmax:
        L = logsumexp(lse, s_1..s_n),  s_i = scale * q . k_i,
        out' = exp(lse - L) out + sum_i exp(s_i - L) v_i,
    all in float32. The dot products over D and the sum over n are written as broadcast
    products and sums, not einsums: an einsum becomes a batched GEMM of [G, D] x [D, n]
    tiles (an fp32 one runs on CUDA cores), about 20 ms per 16k-token unroll on an H200,
    where compiled as reductions the whole merge is a few memory-bound kernels. Eager, the
    broadcasts materialise [T, Hkv, G, n, D] (the CPU tests' sizes only).
    """
    num_tokens, num_heads, head_dim = q_THD.shape
    num_kv_heads = k_TKnD.shape[1]
    q_TKG1D = upcast(q_THD).view(num_tokens, num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    scores_TKGn = (q_TKG1D * upcast(k_TKnD)[:, :, None]).sum(-1) * scale
    lse_TKG1 = upcast(lse_TH).view(*q_TKG1D.shape[:3], 1)
    total_TKG1 = torch.logsumexp(torch.cat([lse_TKG1, scores_TKGn], -1), -1, keepdim=True)
    probs_TKGn1 = torch.exp(scores_TKGn - total_TKG1)[..., None]
    out_TKGD = torch.exp(lse_TKG1 - total_TKG1) * upcast(out_THD).view(q_TKG1D.shape[:3] + (-1,))
    out_TKGD = out_TKGD + (probs_TKGn1 * upcast(v_TKnD)[:, :, None]).sum(-2)
    return out_TKGD.to(q_THD.dtype).view(num_tokens, num_heads, head_dim)
