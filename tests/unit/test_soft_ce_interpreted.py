"""The Triton soft cross-entropy (colocate/draft/soft_ce_triton.py) under Triton's CPU
interpreter, against `kernels.soft_ce_rows`.

Runs where the `triton` package is importable (CUDA builds of torch bring it; the CPU CI
does not, and skips). TRITON_INTERPRET must be set before Triton is imported, so the check
runs in a child process.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_kernel_equals_the_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
