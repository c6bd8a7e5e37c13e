"""Progress lines, and the step loop's timers, on CPU."""

import io

import torch

from colocate.progress import Progress


def test_progress_line_and_final_summary():
    out = io.StringIO()
    p = Progress(enabled=True, max_steps=4, micro_steps=2, every_s=0.0, stream=out)
    p.micro(0, 0, step_tokens=100, trainer_wait_s=0.0, engine_wait_s=0.0)
    p.step_done(0, {"loss": 3.0, "acc_0": 0.25, "sim_accept_length": 1.3}, 200)
    p.micro(1, 1, step_tokens=200, trainer_wait_s=0.0, engine_wait_s=0.0)
    p.finish({"loss": 2.5, "acc_0": 0.5, "acc_1": 0.25, "sim_accept_length": 1.6})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/4 micro 1/2") and "loss -- acc_0 --" in lines[0]
    assert lines[1].startswith("step 2/4 micro 2/2") and "loss 3.0000 acc_0 0.250" in lines[1]
    assert lines[2].startswith("done: 1 steps") and "acc_0 0.500 acc_1 0.250" in lines[2]
    assert lines[2].endswith("sim_accept_length 1.60")


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
