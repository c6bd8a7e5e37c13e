"""The start-up GEMM check (colocate/gemm_check.py) at one MPS SM cap, shape by shape: which
bf16 GEMMs of a model come out wrong as an MPS client under CUDA_MPS_ACTIVE_THREAD_PERCENTAGE.
A script, not a pytest test; tests/gpu/run_sm_cap.sh runs it at each cap, and at 70 again
with each of its BLAS_ENVS (e.g. TORCH_BLAS_PREFER_CUBLASLT=1, which torch reads itself) to
try workarounds.

    python tests/gpu/gemm_cap_probe.py [--tokens 16384] [--hidden 4096 --intermediate 12288
        --heads 32 --kv-heads 8 --head-dim 128 --vocab 151936 --draft-vocab 32000]
        [--role trainer|engine]                                     (Qwen3-8B by default)

One line per shape and GEMM: its relative L2 error against float64 and ok / WRONG. Exit 1
when any is wrong. Without CUDA it runs on the CPU (slow unless the shapes are small).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

from colocate import gemm_check

# Printed in the header when set: the knobs that change which GEMM kernels torch picks.
BLAS_ENVS = ("TORCH_BLAS_PREFER_CUBLASLT", "DISABLE_ADDMM_CUDA_LT", "CUBLAS_WORKSPACE_CONFIG",
             "CUBLASLT_WORKSPACE_SIZE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="rows: tokens per micro-step")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=12288)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936, help="the target's vocabulary")
    p.add_argument("--draft-vocab", type=int, default=32000, help="the Eagle3 lm_head's rows")
    p.add_argument("--role", choices=("trainer", "engine"), default="trainer",
                   help="whose shapes: the trainer's (forward and backward) or the engine's")
    p.add_argument("--sample-rows", type=int, default=8)
    p.add_argument("--tol", type=float, default=2e-2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 0)
    blas = " ".join(f"{k}={os.environ[k]}" for k in BLAS_ENVS if k in os.environ) or "none"
    print(f"MPS SM cap {os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', 'none')}, "
          f"{sms} SMs reported, torch {torch.__version__}, BLAS env {blas}", flush=True)
    dims = SimpleNamespace(num_hidden_layers=1,  # not used by the shapes; Geometry reads it
                           hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                           head_dim=args.head_dim, vocab_size=args.vocab)
    shapes = (gemm_check.engine_gemm_shapes(dims, args.tokens) if args.role == "engine" else
              gemm_check.trainer_gemm_shapes(dims, args.tokens, draft_vocab_size=args.draft_vocab))
    num_wrong, num_gemms, start = 0, 0, time.perf_counter()
    for index, shape in enumerate(shapes):  # same seeds as check_gemms
        errors = gemm_check.gemm_errors(shape, device, sample_rows=args.sample_rows, seed=index)
        for gemm, (rows_err, column_err) in zip(gemm_check.GEMMS, errors):
            err = gemm_check.combined_error(rows_err, column_err, args.tol)
            ok = err <= args.tol  # NaN is not
            num_wrong, num_gemms = num_wrong + (not ok), num_gemms + 1
            print(f"  {str(shape):56s} {gemm:24s} error {err:<9.3g} (rows {rows_err:.3g}, "
                  f"worst column {column_err:.3g}) {'ok' if ok else 'WRONG'}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    verdict = f"{num_wrong} WRONG" if num_wrong else "all ok"
    print(f"{len(shapes)} shapes, {num_gemms} GEMMs in "
          f"{time.perf_counter() - start:.1f} s: {verdict}", flush=True)
    return 1 if num_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
