"""Sequence parallelism end to end, on CPU with torchrun: train.sp_size=2 on 4 pairs trains
exactly what sp_size=1 on 2 pairs trains (the same 2 data shards), stopped and resumed, for
Eagle3 and DFlash; bad combinations are refused at start-up naming the key; a killed trainer
of an SP group ends the job within the timeout, naming it."""

import os
import signal
import time

import pytest

from tests.integration.test_faults import start, wait_for_step, worker_pid
from tests.integration.test_train import metrics, tiny_overrides, torchrun_train
from tests.integration.test_train_dflash import _overrides as dflash_overrides

# Validation too: the pairs of an SP group score their shared held-out share together.
COMMON = ["train.max_steps=6", "draft.unroll_steps=3", "train.log_every_s=0", "data.holdout=8",
          "train.val_every_steps=3", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sp1") / "run")
    proc = torchrun_train(tiny_overrides(tiny_assets, run_dir, *COMMON), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def stopped_and_resumed_sp2(overrides: list[str], run_dir: str, stop_at_step: int) -> list[dict]:
    """train.sp_size=2 on 4 pairs, stopped at `stop_at_step` and resumed: the metrics rows of
    `run_dir` (the overrides' run.dir)."""
    overrides = [*overrides, "train.sp_size=2"]
    first = torchrun_train([*overrides, f"train.stop_at_step={stop_at_step}"], nproc=8,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun_train(overrides, nproc=8, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    return metrics(run_dir)


def assert_trains_like(rows: list[dict], reference: list[dict], num_steps: int,
                       exact: tuple[str, ...]) -> None:
    """Step by step, the statistics equal within rel 1e-5 and the `exact` keys equal."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == \
        list(range(1, num_steps + 1))
    for key in ("loss", "grad_norm", "acc_0", "acc_2", "sim_accept_length", "val_loss",
                "val_sim_accept_length"):
        assert [r.get(key) for r in rows] == pytest.approx([r.get(key) for r in reference],
                                                           rel=1e-5, abs=1e-7), key
    for key in exact:
        assert [r[key] for r in rows] == [r[key] for r in reference], key


def test_sp2_on_four_pairs_equals_sp1_on_two_and_resumes_exactly(tiny_assets, tmp_path,
                                                                  reference):
    run_dir = str(tmp_path / "run")
    rows = stopped_and_resumed_sp2(tiny_overrides(tiny_assets, run_dir, *COMMON), run_dir,
                                   stop_at_step=3)
    # Every token counted once (the engines of a group send their chunk's share).
    assert_trains_like(rows, reference, 6, exact=("tokens", "step_ids_crc32"))


DFLASH_COMMON = ["train.max_steps=4", "train.log_every_s=0", "data.holdout=8",
                 "train.val_every_steps=2"]


def test_dflash_sp2_on_four_pairs_equals_sp1_on_two_and_resumes_exactly(tiny_assets, tmp_path):
    """DFlash: the engines of a group draw the same anchors (from the data shard), each
    trainer trains those in its chunk and gathers the group's context; one short run each
    (4 steps, validating after 2 and 4), the sp run stopped at step 2 and resumed."""
    reference_dir = str(tmp_path / "sp1")
    proc = torchrun_train(dflash_overrides(tiny_assets, reference_dir, *DFLASH_COMMON), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = metrics(reference_dir)
    run_dir = str(tmp_path / "sp2")
    rows = stopped_and_resumed_sp2(dflash_overrides(tiny_assets, run_dir, *DFLASH_COMMON),
                                   run_dir, stop_at_step=2)
    assert_trains_like(rows, reference, 4, exact=("tokens", "labels", "step_ids_crc32"))
    assert reference[1]["val_sim_accept_length"] > 1  # validation ran and replayed replies


@pytest.mark.parametrize("nproc,sp,message", [
    (6, 2, "train.sp_size: 2 does not divide the 3 GPU(s) per node (--nproc-per-node 6, a "
           "trainer and an engine per GPU): a sequence-parallel group must lie on one node; "
           "use one of [1, 3]"),
    # (4 ranks are enough: the heads are checked before the launch geometry)
    (4, 4, "train.sp_size: 4 does not divide the draft's 4 attention heads and 2 key/value "
           "heads (Ulysses gives each trainer of a group a 1/sp_size share of both); use one "
           "of [1, 2]"),
])
def test_bad_sp_size_is_refused_at_start_up(tiny_assets, tmp_path, nproc, sp, message):
    proc = torchrun_train(tiny_overrides(tiny_assets, str(tmp_path / "x"), "train.max_steps=2",
                                         f"train.sp_size={sp}"), nproc=nproc, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert lines and lines[0].endswith(message), proc.stderr[-3000:]
    root = proc.stderr.split("Root Cause")[1]
    assert "exitcode  : 2" in root  # bad input, not a crash


def test_killed_trainer_of_an_sp_group_ends_the_job_naming_it(tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_assets, run_dir, "train.max_steps=200", "draft.unroll_steps=2",
                               "train.log_every_s=0", "train.sp_size=2", "run.timeout_s=20")
    proc = start(overrides, nproc=8)
    wait_for_step(proc, run_dir, 3)
    t0 = time.monotonic()
    os.kill(worker_pid(proc, 2), signal.SIGKILL)  # the second trainer of the first SP group
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 30, err[-3000:]
    assert proc.returncode != 0
    assert "trainer rank 2 closed the pair channel" in err, err[-4000:]
