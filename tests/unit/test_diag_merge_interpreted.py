"""The Triton merge kernels (colocate/draft/diag_merge.py) under Triton's CPU interpreter
(tests/triton_interpreter.py runs it).
"""

from tests.triton_interpreter import needs_triton, worst_error_under_interpreter

CHECK = r'''
import torch
from colocate.draft import diag_merge as dm, kernels
torch.manual_seed(0)
worst = 0.0
# T = 5 and 37: fewer tokens than a program's block, and a partial last block.
for num_diag, group, T in ((1, 4, 5), (6, 4, 37), (3, 1, 37), (2, 3, 9)):
    Hkv, D = 2, 16
    out = torch.randn(Hkv * group, T, D).transpose(0, 1)   # strided, as flex returns it
    lse = (torch.randn(Hkv * group, T) + 3).transpose(0, 1)
    q, grad = torch.randn(T, Hkv * group, D), torch.randn(T, Hkv * group, D)
    k, v = torch.randn(T, Hkv, num_diag, D), torch.randn(T, Hkv, num_diag, D)
    leaves = [x.clone().requires_grad_() for x in (out, lse, q, k, v)]
    merged = dm._MergeDiagonal.apply(*leaves, 0.25)
    got = torch.autograd.grad(merged, leaves, grad)
    want = [kernels.merge_diagonal(out, lse, q, k, v, 0.25),
            *dm.backward_reference(grad, out, lse, q, k, v, 0.25)]
    worst = max([worst] + [(a - b).abs().max().item() for a, b in zip([merged, *got], want)])
print(worst)
'''


@needs_triton
def test_kernels_equal_the_references_under_the_interpreter():
    assert worst_error_under_interpreter(CHECK) < 1e-5
