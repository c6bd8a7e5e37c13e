"""The Triton merge kernel (colocate/draft/diag_merge.py) against its PyTorch references."""

import pytest
import torch

from colocate.draft import diag_merge, kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# float32: the kernel and the reference sum 128-term products in different orders.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_diag,group", [(1, 4), (6, 4), (3, 1)])
def test_triton_merge_equals_reference(dtype, tol, num_diag, group):
    gen = torch.Generator(device="cuda").manual_seed(num_diag)
    T, Hkv, D = 300, 8, 128

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)
    # out and lse as flex returns them: [H, T, *] transposed to [T, H, *] (strided views).
    out = randn(Hkv * group, T, D).transpose(0, 1)
    lse = torch.randn(Hkv * group, T, generator=gen, device="cuda").transpose(0, 1) + 3
    q, grad = randn(T, Hkv * group, D), randn(T, Hkv * group, D)
    k, v = randn(T, Hkv, num_diag, D), randn(T, Hkv, num_diag, D)
    assert diag_merge.usable(q, k)
    leaves = [x.detach().clone().requires_grad_() for x in (out, lse, q, k, v)]
    merged = diag_merge.merge_diagonal(*leaves, D ** -0.5)
    got = torch.autograd.grad(merged, leaves, grad)
    want_merged = kernels.merge_diagonal(out, lse, q, k, v, D ** -0.5)
    want = diag_merge.backward_reference(grad, out, lse, q, k, v, D ** -0.5)
    torch.testing.assert_close(merged.float(), want_merged.float(), rtol=tol, atol=tol)
    for name, a, b in zip(("out", "lse", "q", "k", "v"), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")
