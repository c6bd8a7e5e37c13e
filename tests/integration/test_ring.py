"""The ring protocol between two real processes on CPU (shared-memory slots)."""

import pytest

from colocate.transport.local_pair import run_local_pair
from tests.integration import ring_scenarios as sc


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_roundtrip_variable_sizes(slots):
    engine, trainer = run_local_pair(sc.roundtrip, kwargs=dict(slots=slots, steps=12))
    assert engine.ok, engine.error
    assert trainer.ok, trainer.error
    assert trainer.value == {"steps": 12, "mismatches": []}


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_slow_trainer_throttles_engine_and_nothing_is_overwritten(slots):
    steps = 8
    engine, trainer = run_local_pair(sc.slow_trainer, kwargs=dict(slots=slots, steps=steps,
                                                                  hold_s=0.05))
    assert engine.ok and trainer.ok, (engine.error, trainer.error)
    assert trainer.value["corrupt"] == []
    assert engine.value["max_in_flight"] <= slots
    acquired, released = engine.value["acquired_ns"], trainer.value["released_ns"]
    # Slot of step n is reused by step n + K only after the trainer released step n.
    for n in range(steps - slots):
        assert acquired[n + slots] >= released[n], f"step {n + slots} wrote before release {n}"
    assert engine.value["wait_s"] > 0


def test_layout_mismatch_fails_both_sides_naming_the_tensor():
    engine, trainer = run_local_pair(sc.wrong_layout)
    assert trainer.error.startswith("LayoutMismatch")
    assert "'values' has dtype int32" in trainer.error and "float32" in trainer.error
    assert engine.error.startswith("PeerReportedError")
    assert "'values' has dtype int32" in engine.error and "trainer rank 0" in engine.error


@pytest.mark.parametrize("who,survivor,peer_name", [("engine", "trainer", "engine rank 1"),
                                                    ("trainer", "engine", "trainer rank 0")])
def test_killed_peer_ends_the_other_side_quickly(who, survivor, peer_name):
    engine, trainer = run_local_pair(sc.die_after, kwargs=dict(who=who, steps_before=3),
                                     timeout_s=60.0, grace_s=30.0)
    dead, alive = (engine, trainer) if who == "engine" else (trainer, engine)
    assert dead.exitcode == -9
    assert alive.error.startswith("PeerDied"), alive.error
    assert peer_name in alive.error and "died" in alive.error
    # The wait bound is 60 s: ending this early means EOF was seen, not the timeout.
    assert alive.seconds < 10


def test_frozen_engine_times_out_naming_it():
    engine, trainer = run_local_pair(sc.freeze_after, kwargs=dict(who="engine", steps_before=2),
                                     timeout_s=2.0, grace_s=1.0)
    assert trainer.error.startswith("PeerTimeout"), trainer.error
    assert "engine rank 1" in trainer.error and "step 2" in trainer.error
    assert "2.0 s" in trainer.error
    assert engine.exitcode == -9  # still frozen until the runner killed it


def test_frozen_trainer_times_out_naming_slot_and_step():
    engine, trainer = run_local_pair(sc.freeze_after, kwargs=dict(who="trainer", steps_before=1),
                                     timeout_s=2.0, grace_s=1.0)
    assert engine.error.startswith("PeerTimeout"), engine.error
    assert "trainer rank 0" in engine.error and "slot 1 (step 1)" in engine.error


def test_overflow_names_the_capacity():
    engine, trainer = run_local_pair(sc.overflow, timeout_s=5.0, grace_s=1.0)
    assert engine.error.startswith("SlotOverflow"), engine.error
    assert "slot holds" in engine.error
    assert trainer.error is not None  # the engine went away without sending


def test_out_of_bounds_layout_is_a_layout_error():
    engine, trainer = run_local_pair(sc.out_of_bounds, timeout_s=10.0, grace_s=5.0)
    assert trainer.error.startswith("LayoutMismatch"), trainer.error
    assert "lies outside the" in trainer.error and "'payload'" in trainer.error
    assert engine.error.startswith("PeerReportedError") and "lies outside" in engine.error
