"""Tests that run real gloo ranks in processes: each rank's worker writes one JSON result,
which the test reads back in rank order."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch.distributed as dist


def run_ranks(worker: Callable, world: int, tmp_path, *args) -> list[dict]:
    """worker(rank, init_method, out, *args) on `world` processes, each ending with
    `finish_rank`; their results in rank order."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(worker, args=(f"file://{tmp_path / 'rendezvous'}", out, *args), nprocs=world)
    results = []
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
    return results


def finish_rank(out: str, rank: int, result: dict) -> None:
    """Write this rank's result and leave without interpreter teardown (gloo can abort
    there: see colocate/__main__.py)."""
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    os._exit(0)
