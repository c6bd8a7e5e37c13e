"""Time the Eagle3 soft cross-entropy per unroll step: eager PyTorch, torch.compile
(`draft.kernels=compiled`), and the Triton kernel (colocate/draft/soft_ce_triton.py).

    python tests/gpu/bench_soft_ce.py [--tokens 16384 --vocab 32000]

Prints ms per call (CUDA events, the median of 20 after 5 warm-up calls), the bytes each
must move and the bandwidth that implies.
"""

from __future__ import annotations

import argparse

import torch

from colocate.draft import kernels, soft_ce_triton


def time_ms(fn, *args) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    T, V = args.tokens, args.vocab
    z = torch.randn(T, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(T, V, device="cuda", dtype=torch.bfloat16)
    t_lse = torch.logsumexp(t.float(), -1)
    src = torch.randperm(T, device="cuda")
    w = torch.rand(T, device="cuda")
    moved = 3 * T * V * z.element_size()  # logits and teacher read, gradient written
    print(f"{torch.cuda.get_device_name()}: {T} x {V} bf16, {moved / 1e9:.2f} GB per call")
    for name, fn in (("eager", kernels.soft_ce_rows),
                     ("compiled", torch.compile(kernels.soft_ce_rows)),
                     ("triton", soft_ce_triton.soft_ce_rows)):
        ms = time_ms(fn, z, t, t_lse, src, w)
        print(f"{name:<9} {ms:7.3f} ms  {moved / ms / 1e6:7.0f} GB/s")


if __name__ == "__main__":
    main()
