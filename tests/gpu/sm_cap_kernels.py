"""The trainer's kernels one by one, against float64 references on the host: which of them
goes wrong as an MPS client under an SM cap (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). A script,
not a pytest test; run by tests/gpu/run_sm_cap.sh at each cap before the whole-step check.

    python tests/gpu/sm_cap_kernels.py            (repo root; CPU: a smoke run of the script)

Each line: the kernel, its relative L2 error (gradients too where it has one), and whether
it is within bf16 tolerance. Exit 1 when any is not.
"""

from __future__ import annotations

import os
import sys

import torch

from colocate.draft import kernels

TOL = 2e-2  # bf16 inputs; float64 references


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0
    print(f"MPS SM cap {os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', 'none')}, "
          f"{sms} SMs reported, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    T, H, V = (4096, 4096, 32000) if cuda else (64, 32, 100)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    x, w, head = randn(T, H), randn(H, H, scale=H ** -0.5), randn(V, H, scale=H ** -0.5)
    checks: list[tuple[str, float]] = []

    # cuBLAS: a bf16 GEMM and its two backward GEMMs.
    xd, wd = (t.to(device).clone().requires_grad_() for t in (x, w))
    y = xd @ wd.T
    y.float().square().sum().backward()
    x64, w64 = (t.double().requires_grad_() for t in (x, w))
    y64 = x64 @ w64.T
    y64.square().sum().backward()
    checks += [("matmul bf16", rel(y, y64)), ("matmul grad x", rel(xd.grad, x64.grad)),
               ("matmul grad w", rel(wd.grad, w64.grad))]

    # Reductions the teacher and the loss use.
    logits = (x.double() @ head.double().T)
    got = torch.logsumexp((x.to(device) @ head.to(device).T).float(), -1)
    checks.append(("logsumexp of bf16 logits", rel(got, torch.logsumexp(logits, -1))))

    # The draft's fused kernels, eager and compiled (draft.kernels).
    norm_w = randn(H, scale=1.0) + 1
    ref_norm = kernels.rms_norm(x.double(), norm_w.double(), 1e-6)
    teacher = logits[:, :V // 2]
    t_lse = torch.logsumexp(teacher, -1)
    student = randn(T, V // 2, scale=3.0)
    src, weight = torch.arange(T), torch.ones(T)
    ref_loss, ref_grad, _ = kernels.soft_ce_rows(student.double(), teacher, t_lse, src,
                                                 weight.double())
    for mode in ("eager", "compiled") if cuda else ("eager",):
        norm = kernels.pick(kernels.rms_norm, mode, device)
        checks.append((f"rms_norm {mode}", rel(norm(x.to(device), norm_w.to(device), 1e-6),
                                               ref_norm)))
        ce = kernels.pick(kernels.soft_ce_rows, mode, device)
        loss, grad, _ = ce(student.to(device), teacher.to(device, torch.bfloat16),
                        t_lse.to(device, torch.float32), src.to(device), weight.to(device))
        checks += [(f"soft_ce_rows {mode} loss", rel(loss, ref_loss)),
                   (f"soft_ce_rows {mode} grad", rel(grad, ref_grad))]

    # Attention: flex (the trainer's CUDA kernel) against the float64 softmax reference.
    if cuda:
        from colocate.draft.flex import FLEX_IMPORT_ERROR, compiled_flex_attention
        if FLEX_IMPORT_ERROR is None:
            from torch.nn.attention.flex_attention import create_block_mask

            N, D, L = 8, 128, 2048
            q, k, v = (randn(1, N, L, D).to(device).requires_grad_() for _ in range(3))
            mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, 1, L, L, device=device)
            out = compiled_flex_attention()(q, k, v, block_mask=mask)
            out.float().square().sum().backward()
            q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
            scores = (q64 @ k64.transpose(-1, -2)) * D ** -0.5
            scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -torch.inf)
            out64 = scores.softmax(-1) @ v64
            out64.square().sum().backward()
            checks += [("flex attention", rel(out, out64)), ("flex grad q", rel(q.grad, q64.grad)),
                       ("flex grad k", rel(k.grad, k64.grad)),
                       ("flex grad v", rel(v.grad, v64.grad))]

    bad = 0
    for name, err in checks:
        ok = err <= TOL  # False for NaN too
        bad += not ok
        print(f"  {name:<28} rel L2 {err:.3g}  {'ok' if ok else 'WRONG'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
