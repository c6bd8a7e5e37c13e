"""The Triton soft cross-entropy (colocate/draft/soft_ce_triton.py) under Triton's CPU
interpreter, against `kernels.soft_ce_rows` (tests/triton_interpreter.py runs it).
"""

from tests.triton_interpreter import needs_triton, worst_error_under_interpreter

CHECK = r'''
import torch
from colocate.draft import kernels, soft_ce_triton as sct
sct.BLOCK_V = 64  # several blocks per row, the last one partial
torch.manual_seed(0)
worst = 0.0
for C, N, V in ((5, 7, 200), (3, 3, 64), (1, 4, 65)):
    z = torch.randn(C, V) * 3
    z[0, 10] = z[0, 130 % V] = z[0].max() + 1  # a tie: the first index wins, as torch's
    t = torch.randn(N, V) * 2
    t_lse = torch.logsumexp(t, -1)
    src = torch.randint(0, N, (C,))
    w = torch.rand(C)
    got = sct.soft_ce_rows(z, t, t_lse, src, w)
    want = kernels.soft_ce_rows(z, t, t_lse, src, w)
    assert torch.equal(got[2], want[2]), (got[2], want[2])
    worst = max(worst, abs(got[0] - want[0]).item() / max(abs(want[0]).item(), 1),
                (got[1] - want[1]).abs().max().item())
print(worst)
'''


@needs_triton
def test_kernel_equals_the_reference_under_the_interpreter():
    assert worst_error_under_interpreter(CHECK) < 1e-5
