"""Faults during training, on CPU with torchrun: real signals sent to real processes.

Each test starts `torchrun ... -m colocate train` as a user would (4 ranks: 2 pairs), waits
until training is under way (metrics.jsonl grows), then signals or kills processes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_train import CONFIG, REPO, metrics, tiny_overrides, torchrun_train

COMMON = ["train.max_steps=14", "draft.unroll_steps=2", "train.log_every_s=0"]


def start(overrides, env_extra=None, nproc=4):
    """torchrun in its own session (process group), as a terminal would run it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "colocate", "train", "--config", CONFIG, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc, run_dir, step, timeout=240):
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for line in f if line.endswith("\n")) >= step:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def worker_pid(proc, rank):
    """The pid of torchrun's worker with global rank `rank` (from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != proc.pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(pid)
    raise AssertionError(f"no worker with rank {rank}")


@pytest.fixture(scope="module")
def straight(tiny_assets, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with. Its checkpoint at step 5
    is made 15 s slower than run.timeout_s (10 s) allows a wait: the trainers declare the
    pause to their engines, so the run must not fail (test_a_slow_checkpoint_...)."""
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
         "-m", "colocate", "train", "--config", CONFIG,
         *tiny_overrides(tiny_assets, run_dir, *COMMON, "checkpoint.every_steps=5",
                         "run.timeout_s=10")],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1", COLOCATE_FAULT_SLOW_CHECKPOINT="5:15"))
    return run_dir, proc


def test_a_checkpoint_slower_than_the_timeout_does_not_fail_the_run(straight):
    run_dir, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert proc.stderr.count("fault injection: the checkpoint of step 5 takes 15 s longer") == 2


@pytest.fixture(scope="module")
def reference(straight):
    run_dir, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def assert_same_losses(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference],
                                                      rel=1e-6, abs=1e-6)


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tiny_assets, tmp_path,
                                                                       reference):
    # SLURM's scancel / preemption signals every process of the job at once: torchrun and
    # its workers (which then also get torchrun's forwarded SIGTERM: one stop, not two).
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_assets, run_dir, *COMMON)
    proc = start(overrides)
    wait_for_step(proc, run_dir, 2)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    lines = [l for l in err.splitlines() if l.startswith("colocate train:")]
    assert len(lines) == 1, err[-4000:]
    stopped = len(metrics(run_dir))
    assert 2 <= stopped < 14
    checkpoint = os.path.join(run_dir, "checkpoints", f"step_{stopped:06d}")
    assert lines[0] == (f"colocate train: stopped by SIGTERM (checkpoint written) at step "
                        f"{stopped}/14; last checkpoint {checkpoint}; resume "
                        "with the same command: torchrun --standalone --nproc-per-node 4 -m "
                        f"colocate train --config {CONFIG} " + " ".join(overrides))
    assert not any(l.startswith("[rank") and "Traceback" in l for l in err.splitlines())

    again = torchrun_train(overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoint}" in again.stderr
    assert_same_losses(metrics(run_dir), reference)


@pytest.mark.parametrize("rank,killed", [(3, "engine rank 3"), (2, "trainer rank 2")])
def test_sigkill_of_a_rank_ends_the_job_naming_it_and_rerun_resumes(tiny_assets, tmp_path,
                                                                    reference, rank, killed):
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_assets, run_dir, *COMMON, "checkpoint.every_steps=3")
    proc = start(overrides)
    wait_for_step(proc, run_dir, 4)
    t0 = time.monotonic()
    os.kill(worker_pid(proc, rank), signal.SIGKILL)  # a rank of the second pair
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    # torchrun's summary: the root cause is the killed rank's pair (its peer says why).
    root = err[err.index("Root Cause"):]
    assert "rank      : 2" in root.split("Other Failures")[0] or "rank      : 3" in root
    assert f"{killed} closed the pair channel" in err, err[-4000:]
    lines = [l for l in err.splitlines() if l.startswith("colocate train:")]
    if killed.startswith("engine"):
        # The surviving trainer ends with the summary (a killed trainer leaves none: its
        # engine's line above names it, and torchrun stops the rest).
        assert lines[-1].startswith("colocate train: failed") and "last checkpoint" in lines[-1]
    assert not any("Traceback" in l for l in err.splitlines() if l.startswith("[rank"))

    again = torchrun_train(overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert_same_losses(metrics(run_dir), reference)


def test_nan_gradients_skip_the_step_and_too_many_stop_the_run(tiny_assets, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    # NaN in the first trainer's gradients at step 3 (alone) and at steps 5, 6 (in a row:
    # the limit of 2 stops the run there).
    run_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
         "-m", "colocate", "train", "--config", CONFIG,
         *tiny_overrides(tiny_assets, run_dir, *COMMON, "checkpoint.every_steps=1",
                         "checkpoint.keep_last=10", "train.max_nonfinite_steps=2")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", COLOCATE_FAULT_NAN_GRAD_STEPS="3,5,6"))
    assert proc.returncode != 0
    err = proc.stderr
    lines = [l for l in err.splitlines() if l.startswith("colocate train:")]
    assert lines[0].startswith("colocate train: error: [rank 0] the gradient norm was "
                               "non-finite (NaN or inf) for 2 optimizer steps in a row, up to "
                               "step 6"), err[-3000:]
    assert "train.max_nonfinite_steps" in lines[0]
    assert lines[1].startswith("colocate train: failed (Diverged) at step 5/14")
    rows = metrics(run_dir)
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 1]
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows if not r["skipped"])  # finite
    # Step 3 changed nothing: weights, AdamW moments and step counts as after step 2.
    states = {}
    for step in (2, 3, 4):
        out = str(tmp_path / f"s{step}.pt")
        dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:06d}"), out)
        states[step] = torch.load(out, weights_only=False)
    # (the learning rate in param_groups follows the schedule, skipped step or not)
    flat = {s: {k: v for k, v in _flatten(tree) if not k.startswith("optim.param_groups")}
            for s, tree in states.items()}
    assert flat[2].keys() == flat[3].keys()
    for key, value in flat[2].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(flat[3][key])), key
    changed = [k for k in flat[3] if not torch.equal(torch.as_tensor(flat[3][k]),
                                                      torch.as_tensor(flat[4][k]))]
    assert any(k.startswith("model.") for k in changed)  # step 4 trained again
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_000006"))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_torchrun_stops_its_workers_with_a_checkpoint(tiny_assets, tmp_path):
    # Nothing forwards a stop from a SIGKILLed agent: its workers get SIGTERM from the kernel
    # (PR_SET_PDEATHSIG) and stop as on any SIGTERM, instead of training on unsupervised.
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_assets, run_dir, "train.max_steps=2000",
                               "draft.unroll_steps=2", "train.log_every_s=0")
    proc = start(overrides)
    wait_for_step(proc, run_dir, 2)
    workers = [worker_pid(proc, rank) for rank in range(4)]
    os.kill(proc.pid, signal.SIGKILL)
    try:
        # The workers write to torchrun's pipes: they close when the last worker has exited.
        _, err = proc.communicate(timeout=120)
        survivors = [pid for pid in workers if _alive(pid)]
    finally:
        for pid in workers:  # survivors (the failure this test is for) must not linger
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not survivors, err[-3000:]
    stopped = len(metrics(run_dir))
    assert 2 <= stopped < 2000
    lines = [l for l in err.splitlines() if l.startswith("colocate train:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"colocate train: stopped by SIGTERM (checkpoint written) at step {stopped}/2000"), \
        err[-4000:]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{stopped:06d}"))
