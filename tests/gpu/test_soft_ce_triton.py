"""The Triton soft cross-entropy (colocate/draft/soft_ce_triton.py) against its PyTorch
reference, `kernels.soft_ce_rows`, on a CUDA GPU."""

import pytest
import torch

from colocate.draft import kernels, soft_ce_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("vocab", [32000, 1000])
def test_triton_rows_equal_the_reference(dtype, tol, vocab):
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    C, N = 600, 700
    z = (torch.randn(C, vocab, generator=gen, device="cuda") * 3).to(dtype)
    t = (torch.randn(N, vocab, generator=gen, device="cuda") * 2).to(dtype)
    t_lse = torch.logsumexp(t.float(), -1)
    src = torch.randint(0, N, (C,), generator=gen, device="cuda")
    w = torch.rand(C, generator=gen, device="cuda")
    assert soft_ce_triton.usable(z)
    loss, grad, top = soft_ce_triton.soft_ce_rows(z, t, t_lse, src, w)
    want_loss, want_grad, want_top = kernels.soft_ce_rows(z, t, t_lse, src, w)
    torch.testing.assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol * 1e-3)
    # Ties are rare in random bf16 rows; where one occurs, both take the first index.
    assert torch.equal(top, want_top)
