"""`bench train`'s steady-state numbers from metrics rows, against hand-computed values."""

import pytest

from colocate.bench.train import MODES, step_seconds, summarize

MODE = {m.key: m for m in MODES}


def rows(engine_clock_per_step, step_s=2.0, tokens=1000, warmup_engine_wait=50.0):
    """Four steps; the engine waited 50 s during the trainer's warm-up (before step 2)."""
    out, clock, wait = [], 0.0, 0.0
    for i in range(4):
        clock += engine_clock_per_step if i else 60.0
        wait += 0.5 if i else warmup_engine_wait
        out.append(dict(step_s=step_s, tokens=tokens, engine_clock_s=clock, engine_wait_s=wait,
                        engine_prefill_s=1.0 * (i + 1), trainer_wait_s=0.1 * (i + 1),
                        handoff_s=0.01 * (i + 1), trainer_peak_gib=3.0, engine_peak_gib=4.0,
                        stream_s=step_s, forward_s=0.5 * step_s, backward_s=0.25 * step_s))
    return out


def test_engine_shares_use_the_engines_clock():
    r = summarize(MODE["k3"], rows(engine_clock_per_step=2.0), warmup=1)
    # 3 timed steps: engine wait grew 1.5 s and prefill 3 s over 6 s of the engine's clock.
    assert r.engine_wait == pytest.approx(1.5 / 6.0)
    assert r.breakdown["engine prefill"] == pytest.approx(3.0 / 6.0)
    assert r.tokens_per_s == pytest.approx(3000 / 6.0)     # trainer-side rate
    assert r.trainer_wait == pytest.approx(0.3 / 6.0)
    assert r.breakdown["trainer forward"] == pytest.approx(0.5)


def test_a_steps_time_is_its_stream_time_not_the_hosts():
    assert step_seconds(dict(step_s=0.3, stream_s=0.8, forward_s=0.5)) == 0.8
    # Logs from before `stream_s`: the phases, which tile the stream's timeline.
    assert step_seconds(dict(step_s=0.3, receive_s=0.1, forward_s=0.5, backward_s=0.2)) == \
        pytest.approx(0.8)
    assert step_seconds(dict(step_s=0.3)) == 0.3  # nothing timed on the stream
    # The host ran ahead: step 2's host time is short, step 3's long; the rate is the stream's.
    data = rows(engine_clock_per_step=2.0)
    for row, host in zip(data, (9.0, 0.5, 3.5, 2.0)):
        row["step_s"] = host
    assert summarize(MODE["k3"], data, warmup=1).tokens_per_s == pytest.approx(3000 / 6.0)


def test_the_trainers_window_ends_before_the_steps_the_engine_sat_out():
    """The engine runs `lead` steps ahead, so it has made its last message that many steps
    before the end: the trainer's last steps run alone and faster. They are left out."""
    data = rows(engine_clock_per_step=2.0)
    data += [dict(data[-1]) for _ in range(2)]  # 6 rows
    for row in data[-2:]:
        row.update(stream_s=1.0, forward_s=0.5, backward_s=0.25)  # alone: 1 s, not 2 s
    for i, row in enumerate(data):
        row.update(trainer_wait_s=0.1 * (i + 1), handoff_s=0.01 * (i + 1))
    r = summarize(MODE["k3"], data, warmup=1, engine_lead=2)
    assert r.tokens_per_s == pytest.approx(3000 / 6.0)   # rows 1-3: 2 s each
    assert r.trainer_wait == pytest.approx(0.3 / 6.0)    # over the same rows
    naive = summarize(MODE["k3"], data, warmup=1)         # no lead: the fast tail counts
    assert naive.tokens_per_s == pytest.approx(5000 / 8.0)
    alone = summarize(MODE["trainer"], data, warmup=1, engine_lead=2)  # no engine work: all
    assert alone.tokens_per_s == pytest.approx(5000 / 8.0)
    assert "+ the engine's lead 2" in summarize(MODE["k3"], data[:3], warmup=1,
                                                engine_lead=2).error


def test_engine_alone_rate_comes_from_the_engine_clock():
    # The trainer discards instantly (step_s 0.5 s) but the engine needs 2 s per step.
    r = summarize(MODE["engine"], rows(engine_clock_per_step=2.0, step_s=0.5), warmup=1)
    assert r.tokens_per_s == pytest.approx(3000 / 6.0)


def test_rows_without_an_engine_clock_fall_back_to_step_time():
    data = rows(engine_clock_per_step=2.0)
    for row in data:
        del row["engine_clock_s"]
    r = summarize(MODE["ts"], data, warmup=1)
    assert r.engine_wait == pytest.approx(1.5 / 6.0)


def test_too_few_steps_is_an_error_row():
    assert "need more than --warmup" in summarize(MODE["k3"], rows(2.0), warmup=4).error


def test_rates_are_per_gpu_and_scaling_compares_with_one_gpu():
    from colocate.bench.train import Result, scaling_lines

    # 2 GPUs: 4 pairs' tokens over the same step time count half per GPU.
    r = summarize(MODE["k3"], rows(engine_clock_per_step=2.0, tokens=2000), warmup=1, gpus=2)
    assert r.tokens_per_s == pytest.approx(3000 / 6.0) and r.gpus == 2
    one = Result(MODE["k3"], tokens_per_s=20_000.0, tag="gpus=1", gpus=1)
    two = Result(MODE["k3"], tokens_per_s=19_400.0, tag="gpus=2", gpus=2)
    other = Result(MODE["ts"], tokens_per_s=9_000.0, tag="gpus=2", gpus=2)  # no 1-GPU row
    assert scaling_lines([one, two, other]) == [
        "scaling, colocated MPS K=3 gpus=2: 19,400 tok/s per GPU = 97.0% of one GPU's 20,000"]


def test_online_rows_say_how_much_of_the_window_was_answered_before_it():
    from colocate.bench.train import format_table

    data = rows(engine_clock_per_step=2.0)
    # Running totals as the first engine reports them: answered records and those not yet
    # packed. At the window's start (after step 1) 60 were answered ahead; by its end
    # 300 - 20 = 280 were packed, 40 - 0 = 40 of them before the window: 240 in it.
    for row, (answered, ahead) in zip(data, [(100, 60), (200, 110), (200, 50), (300, 20)]):
        row.update(decode_records=answered, decode_reused=0, decode_ahead=ahead,
                   decode_tokens=answered * 10)
    r = summarize(MODE["online"], data, warmup=1)
    assert r.decode_buffered == pytest.approx(60 / 240)
    assert r.decode_tokens_per_s == pytest.approx(2000 / 6.0)
    table = format_table([r], {"engine": 1e9, "trainer": 1e9}, None, "cpu")
    assert ("the target generated 333 tok/s per engine while training; 25% of the records "
            "trained in the window were answered before it began (a longer window") in table


def test_the_engines_window_starts_as_many_steps_later_as_it_runs_ahead():
    # The engine runs 2 steps ahead: the 50 s it waited for slots while the trainer warmed
    # up reach the rows 2 steps after the warm-up (step index 2 here, warmup=1).
    data = rows(engine_clock_per_step=2.0, warmup_engine_wait=0.5)
    for _ in range(2):
        data.append(dict(data[-1]))
    for i, row in enumerate(data):  # 6 rows; clocks 60, 62, 64+50, ... prefill 1 s a row
        row.update(engine_clock_s=60.0 + 2.0 * i + (50.0 if i >= 2 else 0.0),
                   engine_wait_s=0.5 * i + (50.0 if i >= 2 else 0.0),
                   engine_prefill_s=1.0 * (i + 1))
    naive = summarize(MODE["k3"], data, warmup=1)
    assert naive.engine_wait == pytest.approx((2.5 + 50.0) / 60.0)  # the warm-up's wait in
    r = summarize(MODE["k3"], data, warmup=1, engine_lead=2)
    # The engine's window: rows 3..5 after row 2: 1.5 s wait, 3 s prefill over 6 s.
    assert r.engine_wait == pytest.approx(1.5 / 6.0)
    assert r.breakdown["engine prefill"] == pytest.approx(3.0 / 6.0)
    engine_alone = summarize(MODE["engine"], data, warmup=1, engine_lead=2)
    assert engine_alone.tokens_per_s == pytest.approx(3000 / 6.0)  # the engine's window's
    short = summarize(MODE["engine"], data[:3], warmup=1, engine_lead=2)  # nothing to shift
    assert short.tokens_per_s == pytest.approx(2000 / 54.0)


def test_engine_lead_is_the_slots_over_the_micro_steps(tmp_path):
    import argparse

    from colocate.bench.train import engine_lead_steps

    args = argparse.Namespace(config=None, overrides=["train.micro_steps=2"])
    assert engine_lead_steps(args, MODE["k3"]) == 2  # ceil(3 / 2)
    assert engine_lead_steps(args, MODE["k2"]) == 1
    assert engine_lead_steps(args, MODE["k2"], sweep="train.micro_steps=1") == 2


def test_online_steady_state_is_the_last_whole_decode_cycle():
    from colocate.bench.train import format_table

    # Six steps of 1000 tokens. Chunks arrive at steps 3 and 6 (decode_records grows there);
    # the cycle is steps 4-6: 3 s of steps, of which the trainer waited 1.5 s at step 6.
    data = []
    for step, (records, step_s, wait) in enumerate(
            [(10, 5.0, 4.0), (10, 1.0, 4.0), (20, 1.0, 4.0), (20, 0.5, 4.0), (20, 0.5, 4.0),
             (30, 2.0, 5.5)], start=1):
        data.append(dict(step_s=step_s, tokens=1000, engine_clock_s=10.0 * step,
                         engine_wait_s=0.0, engine_prefill_s=1.0, trainer_wait_s=wait,
                         handoff_s=0.0, trainer_peak_gib=1.0, engine_peak_gib=1.0,
                         decode_records=records, decode_reused=0, decode_ahead=5,
                         decode_tokens=records * 100))
    r = summarize(MODE["online"], data, warmup=1)
    c = r.cycle
    assert (c.first_step, c.last_step) == (4, 6)
    assert c.tokens_per_s == pytest.approx(3000 / 3.0)
    assert c.trainer_wait == pytest.approx(1.5 / 3.0)
    assert c.decode_tokens_per_s == pytest.approx(1000 / 3.0)
    pregen = summarize(MODE["pregen"], [dict(d, tokens=2000) for d in data], warmup=1)
    table = format_table([pregen, r], {"engine": 1e9, "trainer": 1e9}, None, "cpu")
    assert ("last whole decode cycle (steps 4-6, chunk arrival to arrival): 1,000 tok/s/GPU "
            "trained, trainer wait 50.0%, the target generated 333 tok/s per engine; 0.50x "
            "pre-generated") in table
    # One arrival in the window is no cycle: the table says so instead of guessing.
    short = summarize(MODE["online"], data[:5], warmup=1)
    assert short.cycle is None
    assert "no whole decode cycle" in format_table([short], {"engine": 1e9, "trainer": 1e9},
                                                  None, "cpu")
