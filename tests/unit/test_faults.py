"""Stop signals, torchrun's error files, exit statuses and non-finite steps, in-process."""

import copy
import os
import signal
import sys
import time

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from colocate import exit_codes
from colocate.failures import write_error_file
from colocate.train.health import NonFiniteGuard
from colocate.train.signals import REPEAT_GRACE_S, STOP_SIGNALS, StopRequest


@pytest.fixture
def stop():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    request = StopRequest()
    request.install()
    yield request
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_first_signal_only_asks_a_repeat_within_the_grace_is_the_same(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches a worker twice: terminal + torchrun
    assert stop.signal_name == "SIGTERM"


def test_a_second_signal_later_stops_at_once(stop):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(REPEAT_GRACE_S + 0.1)
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs between bytecodes; never reached
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a third one is not caught


def test_torchrun_names_the_root_cause_not_the_follower(tmp_path, monkeypatch):
    # Rank 0 only saw rank 1 fail, and fails in the same second as rank 1; torchrun's
    # summary must still name rank 1's error as the root cause.
    files = {r: str(tmp_path / f"r{r}" / "error.json") for r in (0, 1)}
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[1])
    assert write_error_file("colocate train: error: [rank 1] data.path: no such file",
                            root_cause=True)
    assert not write_error_file("a later consequence", root_cause=True)  # the first one wins
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[0])
    assert write_error_file("[rank 0] the engine failed", root_cause=False)
    failures = {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=2 + r, error_file=files[r])
                for r in (0, 1)}
    error = ChildFailedError("colocate", failures)
    rank, failure = error.get_first_failure()
    assert rank == 1
    root = str(error).split("Root Cause")[1].split("Other Failures")[0]
    assert "data.path: no such file" in root and "To enable traceback" not in str(error)


def test_exit_statuses():
    from colocate.config import ConfigError
    from colocate.transport import PeerDied, PeerReportedError
    from colocate.transport.ring import ConsumerStopped

    assert exit_codes.exit_code_for(ConfigError("x")) == exit_codes.BAD_INPUT == 2
    assert exit_codes.exit_code_for(FileNotFoundError("x")) == exit_codes.BAD_INPUT
    assert exit_codes.exit_code_for(PeerDied("x")) == exit_codes.PEER_FAILED == 3
    assert exit_codes.exit_code_for(PeerReportedError("x")) == exit_codes.PEER_FAILED
    assert exit_codes.is_quiet(PeerReportedError("x")) and not exit_codes.is_quiet(PeerDied("x"))
    assert exit_codes.exit_code_for(exit_codes.Diverged("x")) == exit_codes.DIVERGED == 4
    assert exit_codes.exit_code_for(ConsumerStopped("x")) == exit_codes.INTERRUPTED == 75
    assert exit_codes.exit_code_for(KeyboardInterrupt()) == exit_codes.INTERRUPTED
    assert exit_codes.exit_code_for(ZeroDivisionError()) == exit_codes.INTERNAL == 1


def _model_and_optimizer(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    return model, optimizer


def _train_step(model, optimizer, guard, step, poison=False, dead=False):
    (model(torch.ones(2, 4)).square().sum() * (0.0 if dead else 1.0)).backward()
    grads = [p.grad for p in model.parameters()]
    if poison:
        grads[0].view(-1)[0] = float("nan")
    norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
    guard.step(optimizer, norm, step)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [None, True])  # host check / the fused kernel's found_inf
def test_a_non_finite_step_changes_nothing_and_a_streak_stops(fused):
    model, optimizer = _model_and_optimizer(fused)
    guard = NonFiniteGuard(2, torch.device("cpu"))
    _train_step(model, optimizer, guard, 0)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train_step(model, optimizer, guard, 1, poison=True)  # skipped: weight decay would move
    assert guard.num_skipped == 1 and guard.in_a_row == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state["state"][index][key]), (index, key)
    _train_step(model, optimizer, guard, 2)  # a good step resets the streak and trains
    assert guard.in_a_row == 0 and not torch.equal(model.weight, weights["weight"])
    _train_step(model, optimizer, guard, 3, poison=True)
    with pytest.raises(exit_codes.Diverged, match="2 optimizer steps in a row, up to step 5"):
        _train_step(model, optimizer, guard, 4, poison=True)


@pytest.mark.parametrize("fused", [None, True])
def test_a_streak_of_exactly_zero_gradients_stops(fused):
    # A trainer whose loss does not depend on its weights (an H200 under an MPS SM cap gave
    # a loss and gradient norm of exactly 0 on every step) must not train on in silence.
    model, optimizer = _model_and_optimizer(fused)
    guard = NonFiniteGuard(3, torch.device("cpu"))
    for step in range(2):
        _train_step(model, optimizer, guard, step, dead=True)
    _train_step(model, optimizer, guard, 2)  # a real gradient resets the streak
    assert guard.zero_in_a_row == 0 and guard.num_skipped == 0
    for step in range(3, 5):
        _train_step(model, optimizer, guard, step, dead=True)
    with pytest.raises(exit_codes.Diverged, match="exactly 0 for 3 optimizer steps in a row, "
                                                  "up to step 6"):
        _train_step(model, optimizer, guard, 5, dead=True)


def test_a_send_to_a_peer_that_left_raises_its_last_error_past_other_messages():
    import socket

    from colocate.transport import PairChannel, PeerId, PeerReportedError

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trainer = PairChannel(a, "trainer rank 0", PeerId("engine", 1, os.getpid()))
    engine = PairChannel(b, "engine rank 1", PeerId("trainer", 0, os.getpid()))
    engine.send("data", slot=0, step=7)  # unread by the trainer, busy checkpointing
    engine.report_error("engine rank 1: PeerTimeout: no answer within 10 s")
    engine.close()
    with pytest.raises(PeerReportedError, match="engine rank 1 failed: .*no answer within 10 s"):
        for _ in range(100):  # the first sends may still fit the socket buffer
            trainer.send("ack", slot=0, step=7)
    trainer.close()


def _collective_after_tightening(rank: int, init: str, out: str) -> None:
    import datetime
    import time

    import torch.distributed as dist

    from colocate.topology import Topology

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group([0, 1], backend="gloo", timeout=datetime.timedelta(seconds=120))
    topo = Topology(info=None, device=torch.device("cpu"), job_token="", pids=(), nodes=(),
                    role_group=group, role_cpu_group=group)
    assert topo.bound_collectives(1.0)
    if rank == 1:
        time.sleep(15)  # never joins: rank 0 must give up at the tightened bound, not 120 s
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        result = "completed"
    except RuntimeError as e:
        result = f"raised after {time.monotonic() - start:.0f} s: {type(e).__name__}"
    with open(out, "w") as f:
        f.write(result)
    os._exit(0)  # no teardown: gloo can abort there after a failed collective (__main__.py)


def test_collectives_are_bounded_by_the_tightened_timeout(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.txt")
    mp.start_processes(_collective_after_tightening, args=(f"file://{tmp_path / 'store'}", out),
                       nprocs=2, start_method="spawn")
    result = open(out).read()
    # Raised at the 1 s bound (well before the groups' own 120 s, and before rank 1 woke).
    assert result.startswith("raised after") and int(result.split()[2]) < 15, result


def test_a_stopped_run_ends_its_served_evals(tmp_path, caplog):
    # A real child standing in for `colocate eval` (which needs a model); stop() must end it
    # and say how to run it again, as when SIGTERM stops training mid-evaluation.
    import logging
    import subprocess
    import sys

    from colocate.config import load_config
    from colocate.train.served_eval import ServedEvals, _Pending

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    evals = ServedEvals(cfg)
    out = str(tmp_path / "run" / "evals" / "step_00000004" / "eval.json")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    evals.pending.append(_Pending(4, out, str(tmp_path / "eval.log"), proc, time.monotonic()))
    with caplog.at_level(logging.WARNING):
        evals.stop("stopped by SIGTERM")
    assert proc.poll() == -signal.SIGTERM and not evals.pending
    assert "served eval of step 4 stopped (stopped by SIGTERM); run it again with: python -m " \
           "colocate eval --config" in caplog.text


def test_the_resume_line_is_the_command_that_started_the_run(monkeypatch):
    from colocate.failures import resume_hint

    monkeypatch.setattr(sys, "argv", ["colocate", "train", "--config", "my run.yaml",
                                      "train.max_steps=9"])
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "COLOCATE_RESUME_WITH"):
        monkeypatch.delenv(name, raising=False)
    assert resume_hint() == ("resume with the same command: python -m colocate train --config "
                             "'my run.yaml' train.max_steps=9")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_hint() == ("resume with the same command: torchrun --nnodes 2 (same "
                             "rendezvous) --nproc-per-node 4 -m colocate train --config "
                             "'my run.yaml' train.max_steps=9")
    # launch/slurm.sbatch: the job requeues itself (REQUEUE=1), or is submitted again.
    monkeypatch.setenv("COLOCATE_RESUME_WITH", "requeue")
    assert resume_hint().startswith("the SLURM job requeues itself and resumes")
    monkeypatch.setenv("COLOCATE_RESUME_WITH", "sbatch --nodes 2 launch/slurm.sbatch")
    assert resume_hint() == ("resume by submitting the job again with the same sbatch "
                             "options: sbatch --nodes 2 launch/slurm.sbatch --config "
                             "'my run.yaml' train.max_steps=9")
