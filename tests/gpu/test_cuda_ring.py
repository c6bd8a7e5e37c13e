"""The ring over CUDA IPC between two real processes on GPU 0 (skipped without CUDA)."""

import pytest
import torch

from colocate.transport.local_pair import run_local_pair
from tests.integration import ring_scenarios as sc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_cuda_roundtrip(slots):
    engine, trainer = run_local_pair(sc.roundtrip, kwargs=dict(slots=slots, steps=16),
                                     device="cuda:0", timeout_s=60.0)
    assert engine.ok and trainer.ok, (engine.error, trainer.error)
    assert trainer.value == {"steps": 16, "mismatches": []}


def test_cuda_slow_trainer_nothing_overwritten():
    engine, trainer = run_local_pair(sc.slow_trainer, kwargs=dict(slots=2, steps=8, hold_s=0.05),
                                     device="cuda:0", timeout_s=60.0)
    assert engine.ok and trainer.ok, (engine.error, trainer.error)
    assert trainer.value["corrupt"] == [] and engine.value["max_in_flight"] <= 2


def test_cuda_layout_mismatch_both_sides():
    engine, trainer = run_local_pair(sc.wrong_layout, device="cuda:0", timeout_s=60.0)
    assert trainer.error.startswith("LayoutMismatch") and "'values'" in trainer.error
    assert engine.error.startswith("PeerReportedError") and "'values'" in engine.error


def test_cuda_killed_engine_seen_quickly():
    engine, trainer = run_local_pair(sc.die_after, kwargs=dict(who="engine", steps_before=3),
                                     device="cuda:0", timeout_s=60.0, grace_s=30.0)
    assert engine.exitcode == -9
    assert trainer.error.startswith("PeerDied") and "engine rank 1" in trainer.error
    assert trainer.seconds < 10
