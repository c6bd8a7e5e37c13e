"""metrics.jsonl rows and progress lines from MetricsLog / Progress on a 1-rank gloo group."""

import io
import json
import os

import pytest
import torch
import torch.distributed as dist

from colocate.progress import MetricsLog, Progress


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0,
                                world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()  # other tests expect no default group in this process


def test_metrics_rows_are_written_on_flush(group, tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path, group=group, device=torch.device("cpu"), num_pairs=1,
                     flush_every_s=3600)
    for step in range(3):
        log.record(step, torch.tensor([2.0 - step, 0.5, 0.25]), torch.tensor(1.5), lr=1e-3,
                   tokens=100, seconds=0.5, trainer_wait_s=0.1, engine_wait_s=0.2)
    assert not os.path.exists(path)  # nothing converted before a flush: no host sync
    log.flush()
    rows = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] == 0.0 and rows[0]["acc_0"] == 0.5 and rows[0]["acc_1"] == 0.25
    assert rows[0]["accept_length"] == pytest.approx(1 + 0.5 + 0.125)
    assert rows[0]["tokens_per_s"] == 200 and rows[0]["engine_wait_s"] == 0.2
    assert log.last == rows[-1]


def test_tensorboard_flag_warns_when_missing(group, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.warns(UserWarning, match="train.tensorboard=true ignored"):
        MetricsLog(str(tmp_path / "m.jsonl"), group=group, device=torch.device("cpu"),
                   num_pairs=1, tensorboard_dir=str(tmp_path / "tb"))


def test_progress_line_and_final_summary():
    out = io.StringIO()
    p = Progress(enabled=True, max_steps=4, micro_steps=2, every_s=0.0, stream=out)
    p.micro(0, 0, step_tokens=100, trainer_wait_s=0.0, engine_wait_s=0.0)
    p.step_done(0, {"loss": 3.0, "acc_0": 0.25, "accept_length": 1.3}, 200)
    p.micro(1, 1, step_tokens=200, trainer_wait_s=0.0, engine_wait_s=0.0)
    p.finish({"loss": 2.5, "acc_0": 0.5, "acc_1": 0.25, "accept_length": 1.6})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/4 micro 1/2") and "loss -- acc_0 --" in lines[0]
    assert lines[1].startswith("step 2/4 micro 2/2") and "loss 3.0000 acc_0 0.250" in lines[1]
    assert lines[2].startswith("done: 1 steps") and "acc_0 0.500 acc_1 0.250" in lines[2]


def test_phase_timer_and_busy_clock_on_cpu():
    import time as _time

    from colocate.progress import BusyClock, PhaseTimer, phase_seconds

    timer = PhaseTimer(torch.device("cpu"))
    timer.mark("start")
    _time.sleep(0.02)
    timer.mark("forward")
    _time.sleep(0.01)
    timer.mark("backward")
    _time.sleep(0.01)
    timer.mark("forward")
    first = phase_seconds(timer.take())
    assert set(first) == {"forward", "backward"}
    # sleep never returns early: lower bounds are exact; the two forward phases add up
    assert first["forward"] >= 0.03 and first["backward"] >= 0.01
    timer.mark("optimizer")
    assert set(phase_seconds(timer.take())) == {"optimizer"}  # continues from the last mark
    off = PhaseTimer(torch.device("cpu"), enabled=False)
    off.mark("x")
    assert off.take() == []

    clock = BusyClock(torch.device("cpu"))
    clock.begin()
    _time.sleep(0.01)
    clock.end()
    assert clock.read() >= 0.01 and clock.read() == clock.total_s
