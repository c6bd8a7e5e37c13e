"""The launch geometry's rules: two ranks per GPU, and sequence-parallel groups inside a node.

One owner, without torch, for the two places that apply them: the launcher's pre-flight
(`colocate check`, preflight.py, from torchrun's numbers before any worker starts) and
start-up (topology.py, on every rank). Each rule returns the problem in words, or None;
the caller raises its own error type.
"""

from __future__ import annotations

import os


def nproc_problem(nproc_per_node: int) -> str | None:
    """Why --nproc-per-node cannot run (None: it can): every GPU holds a trainer and an engine."""
    if nproc_per_node >= 2 and nproc_per_node % 2 == 0:
        return None
    return (f"--nproc-per-node {nproc_per_node}: colocate runs a trainer and an engine per "
            "GPU; use an even number >= 2 (twice the GPUs per node; NPROC=4 on CPU)")


def sp_size_problem(nproc_per_node: int, sp_size: int) -> str | None:
    """Why train.sp_size cannot run with --nproc-per-node (None: it can). An SP group is
    sp_size consecutive pairs on one node (its all-to-alls stay inside)."""
    gpus_per_node = nproc_per_node // 2
    if sp_size <= 1 or gpus_per_node % sp_size == 0:
        return None
    divisors = [d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0]
    return (f"train.sp_size: {sp_size} does not divide the {gpus_per_node} GPU(s) per node "
            f"(--nproc-per-node {nproc_per_node}, a trainer and an engine per GPU): a "
            f"sequence-parallel group must lie on one node; use one of {divisors}")


def gpu_count_problem(nproc_per_node: int, num_gpus: int) -> str | None:
    """Why --nproc-per-node does not fit the GPUs this node sees (None: it does)."""
    if nproc_per_node == 2 * num_gpus:
        return None
    return (f"--nproc-per-node {nproc_per_node} but {num_gpus} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): use "
            f"--nproc-per-node {2 * num_gpus} (two ranks per GPU), or run.device=cpu")
