"""draft.kernels=compiled computes what the eager reference computes (CPU inductor backend).

The CUDA run uses Triton instead of C++ code generation; tests/gpu/profile_trainer.py
compares the two modes on a GPU. Shapes change between calls on purpose: micro-steps vary
in length, so the compiled functions must recompile (dynamic) and still agree.
"""

import pytest
import torch

from colocate.draft import kernels
from tests.unit.test_draft_loss import make_batch, tiny_draft, unroll


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return bool(get_cpp_compiler())
    except Exception:  # no compiler found (raises), or an older torch layout
        return False


pytestmark = pytest.mark.skipif(not _has_cpp_compiler(),
                                reason="no C++ compiler for the CPU inductor backend")


def _eager_and_compiled(fn, *inputs):
    """(outputs, grads of float inputs) for fn eager and compiled on the same inputs."""
    results = []
    for call in (fn, kernels.pick(fn, "compiled", torch.device("cpu"))):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point())
                  if isinstance(x, torch.Tensor) else x for x in inputs]
        out = call(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        grads = torch.autograd.grad(total, [x for x in leaves
                                            if isinstance(x, torch.Tensor) and x.requires_grad])
        results.append(([o.detach() for o in outs], grads))
    return results


@pytest.mark.parametrize("num_tokens", [24, 37])
def test_rms_norm_silu_rope_compiled_equal_eager(num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    x, w = torch.randn(num_tokens, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    gate, up = torch.randn(num_tokens, 96, generator=gen), torch.randn(num_tokens, 96, generator=gen)
    q, k = torch.randn(num_tokens, 4, 16, generator=gen), torch.randn(num_tokens, 2, 16, generator=gen)
    positions = torch.randint(0, 500, (num_tokens,), generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    for fn, inputs in ((kernels.rms_norm, (x, w, 1e-6)), (kernels.silu_mul, (gate, up)),
                       (kernels.rope_qk, (q, k, positions, inv_freq))):
        (eager_out, eager_grads), (comp_out, comp_grads) = _eager_and_compiled(fn, *inputs)
        for a, b in zip(eager_out + list(eager_grads), comp_out + list(comp_grads)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [10, 13])
def test_soft_ce_compiled_equals_eager(rows):
    gen = torch.Generator().manual_seed(rows)
    vocab = 50
    logits = torch.randn(rows, vocab, generator=gen).bfloat16()
    teacher = (3 * torch.randn(rows + 4, vocab, generator=gen)).bfloat16()
    lse = teacher.float().logsumexp(-1)
    src = torch.randint(0, rows + 4, (rows,), generator=gen)
    weight = torch.rand(rows, generator=gen)
    eager = kernels.soft_ce_rows(logits, teacher, lse, src, weight)
    compiled = kernels.pick(kernels.soft_ce_rows, "compiled", torch.device("cpu"))(
        logits, teacher, lse, src, weight)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1].float(), eager[1].float(), rtol=1e-2, atol=1e-4)
    assert torch.equal(compiled[2], eager[2])
    assert torch.equal(eager[2], logits.argmax(-1))  # the draft's greedy token per row
    # And both against plain autograd of the definition, in float32.
    ref_logits = logits.float().requires_grad_(True)
    p = torch.softmax(teacher.float(), -1)[src]
    ref = (weight * -(p * torch.log_softmax(ref_logits, -1)).sum(-1)).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(eager[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[1].float(), ref_grad, rtol=1e-2, atol=1e-4)


def test_unroll_compiled_equals_eager():
    """Whole unroll, forward and backward, in float32: loss, metrics and every gradient."""
    batch = make_batch([9, 14], seed=11, dtype=torch.float32)
    results = {}
    for mode in ("eager", "compiled"):
        draft = tiny_draft(std=0.3, dtype=torch.float32)
        for module in draft.modules():
            if hasattr(module, "kernels"):
                module.kernels = mode
        result = unroll(draft, batch, unroll_steps=3)
        result.loss.backward()
        results[mode] = (result, {n: p.grad for n, p in draft.named_parameters()})
    (eager, eager_grads), (comp, comp_grads) = results["eager"], results["compiled"]
    torch.testing.assert_close(comp.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.ce_sum, eager.ce_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(comp.counted, eager.counted)
    assert torch.equal(comp.hits, eager.hits)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scale_compiled_equals_eager_and_the_plain_product():
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(13, 50, generator=gen).bfloat16()
    factor = torch.tensor(0.37, dtype=torch.float32)  # a 0-d tensor, as autograd passes it
    eager = kernels.scale(grad, factor)
    compiled = kernels.pick(kernels.scale, "compiled", torch.device("cpu"))(grad, factor)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    assert torch.equal(eager, grad * factor.bfloat16())
    # Inductor multiplies by the float32 factor (it does not emulate the cast's rounding):
    # equal up to bf16 rounding, and closer to the exact product.
    exact = grad.double() * 0.37
    torch.testing.assert_close(compiled.double(), exact, rtol=8e-3, atol=0)
    assert (compiled.double() - exact).abs().sum() <= (eager.double() - exact).abs().sum()


@pytest.mark.parametrize("num_diag", [1, 3])
def test_merge_diagonal_compiled_equals_eager_and_one_softmax(num_diag):
    """The merge of flex's causal output with the diagonal keys equals one softmax over the
    union (built densely here), and compiled equals eager, gradients included (also through
    the log-sum-exp, which flex differentiates)."""
    gen = torch.Generator().manual_seed(num_diag)
    T, Hq, Hkv, D, scale = 11, 4, 2, 8, 8 ** -0.5
    q, k0, v0 = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    kd, vd = (torch.randn(T, Hkv, num_diag, D, generator=gen) for _ in range(2))
    # The causal part over k0, by hand: [Hq, T, T] scores with the future masked.
    k0_q, v0_q = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k0, v0))
    causal = torch.einsum("thd,shd->hts", q, k0_q) * scale
    causal = causal.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(causal, -1).T  # [T, Hq]
    out = torch.einsum("hts,shd->thd", torch.softmax(causal, -1), v0_q)
    diag = torch.einsum("thd,thnd->thn", q, kd.repeat_interleave(Hq // Hkv, dim=1)) * scale
    probs = torch.softmax(torch.cat([causal.permute(1, 0, 2), diag], -1), -1)  # [T, Hq, T+n]
    want = (torch.einsum("ths,shd->thd", probs[..., :T], v0_q)
            + torch.einsum("thn,thnd->thd", probs[..., T:], vd.repeat_interleave(Hq // Hkv, 1)))
    (eager_out, eager_grads), (comp_out, comp_grads) = _eager_and_compiled(
        kernels.merge_diagonal, out, lse, q, kd, vd, scale)
    torch.testing.assert_close(eager_out[0], want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager_out + list(eager_grads), comp_out + list(comp_grads)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_diag,group", [(1, 4), (3, 2), (6, 1)])
def test_diag_merge_backward_formulas_equal_autograd(num_diag, group):
    """The gradient formulas the Triton merge kernel implements (diag_merge.py), written in
    PyTorch, equal autograd through kernels.merge_diagonal (float64)."""
    from colocate.draft import diag_merge
    gen = torch.Generator().manual_seed(num_diag)
    T, Hkv, D = 9, 2, 8
    out, q, grad = (torch.randn(T, Hkv * group, D, generator=gen, dtype=torch.float64)
                    for _ in range(3))
    lse = torch.randn(T, Hkv * group, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(T, Hkv, num_diag, D, generator=gen, dtype=torch.float64)
            for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (out, lse, q, k, v)]
    merged = kernels.merge_diagonal(*leaves, 0.3)
    want = torch.autograd.grad(merged, leaves, grad)
    got = diag_merge.backward_reference(grad, out, lse, q, k, v, 0.3)
    for name, a, b in zip(("out", "lse", "q", "k", "v"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert not diag_merge.usable(q, k)  # CPU: the PyTorch path
