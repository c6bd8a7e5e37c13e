"""Every formula of colocate/metrics.py against hand-computed values and slow references:
per-token reductions of the stats vector, the simulated accept length, the metrics.jsonl
rows, FLOPs and the disaggregated references."""

import json
import os
import random

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from colocate.metrics import (Geometry, MetricsLog, disaggregated_references, draft_params,
                              draft_train_flops_per_token, leading_hits, mfu, peak_flops,
                              sim_accept_sums, stats_vector, step_summary,
                              target_prefill_flops_per_token)
from colocate.trackers import JsonlTracker, Trackers


def micro_stats(ce, hits, counted, sim=(0, 0)):
    return stats_vector(torch.tensor(ce, dtype=torch.float32), torch.tensor(hits),
                        torch.tensor(counted), torch.tensor(sim))


# ----------------------------------------------------------------- per-token reductions


def test_micro_steps_pool_per_token_not_as_a_mean_of_means():
    # 10 labels with CE 2.0 each and 9 hits; 1000 labels with CE 0.5 and 100 hits.
    small = micro_stats([20.0], [9], [10], sim=(12, 10))
    large = micro_stats([500.0], [100], [1000], sim=(1200, 600))
    row = step_summary((small + large).tolist(), position_decay=0.8)
    assert row["loss"] == pytest.approx(520 / 1010) and row["loss_0"] == row["loss"]
    assert row["acc_0"] == pytest.approx(109 / 1010)  # the mean of means would say 0.5
    assert row["sim_accept_length"] == pytest.approx(1212 / 610) and row["labels"] == 1010


def test_step_summary_weights_unroll_steps_by_decay():
    values = micro_stats([30.0, 40.0, 0.0], [6, 2, 0], [10, 8, 0], sim=(20, 8)).tolist()
    row = step_summary(values, position_decay=0.5)
    assert row["loss_0"] == 3.0 and row["loss_1"] == 5.0 and row["loss_2"] == 0.0
    assert row["loss"] == 3.0 + 0.5 * 5.0  # a step without labels adds nothing
    assert (row["acc_0"], row["acc_1"], row["acc_2"]) == (0.6, 0.25, 0.0)
    assert row["sim_accept_length"] == 2.5
    no_cycles = step_summary(micro_stats([0.0], [0], [0], sim=(3, 0)).tolist(), 0.8)
    assert no_cycles["sim_accept_length"] == 1.0


# ----------------------------------------------------------------- simulated accept length


def reference_walk(hits_KT, loss_mask, seq_lens):
    """Greedy chain serving, one reply at a time, in plain Python."""
    hits = hits_KT.tolist()
    mask = loss_mask.tolist()

    def lead(t):
        n = 0
        while n < len(hits) and hits[n][t]:
            n += 1
        return n

    tokens = cycles = 0
    start = 0
    for length in seq_lens:
        i = 0
        while i < length:
            if not mask[start + i]:
                i += 1
                continue
            a = i
            while i < length and mask[start + i]:
                i += 1
            b = i
            tokens += b - a
            c = a  # x_a from the prefill
            while c < b - 1:
                drafted = lead(start + c - 1) if c >= 1 else 0
                c = min(c + drafted + 1, b - 1)
                cycles += 1
        start += length
    return tokens, cycles


def seq_end(seq_lens):
    ends = torch.cumsum(torch.tensor(seq_lens), 0)
    return torch.repeat_interleave(ends, torch.tensor(seq_lens))


def test_leading_hits_stop_at_the_first_miss():
    hits = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert leading_hits(hits).tolist() == [2, 1, 0, 3]


def test_sim_accept_sums_hand_worked():
    # Sequence 0 (indices 0..11): prompt 0..2, reply A = [3, 9), index 9 unmasked, reply
    # B = [10, 12). Sequence 1 (12..17): all masked, reply C = [12, 18). Sequence 2 (18..20):
    # reply D = [20, 21), one token.
    seq_lens = [12, 6, 3]
    mask = torch.zeros(21, dtype=torch.bool)
    mask[3:9] = mask[10:12] = mask[12:18] = mask[20] = True
    hits = torch.zeros(3, 21, dtype=torch.bool)

    def set_hits(t, steps):
        for k in steps:
            hits[k, t] = True

    set_hits(2, [0])        # lead(2) = 1
    set_hits(3, [0, 1, 2])  # lead(3) = 3, but no cycle drafts from 3
    set_hits(4, [0, 1, 2])  # lead(4) = 3
    set_hits(9, [0])        # lead(9) = 1
    set_hits(11, [0, 1, 2])  # last token of sequence 0: never drafts for sequence 1
    set_hits(12, [1])       # a miss at step 0: lead(12) = 0 whatever follows
    set_hits(13, [0, 1])    # lead(13) = 2
    # A: x_3 from the prefill; cycle 1 drafts from 2: 1 accepted + 1 -> through 5; cycle 2
    #    drafts from 4: 3 accepted + 1 = through 9, capped at the reply's end 8. 6 tokens, 2.
    # B: x_10 prefill; cycle 1 drafts from 9: 1 + 1 -> 12, capped at 11. 2 tokens, 1 cycle.
    # C: x_12 prefill; cycle 1 has no draft (sequence start) -> 13; cycle 2 drafts from 12:
    #    0 + 1 -> 14; cycle 3 drafts from 13: 2 + 1 -> 17 = the end. 6 tokens, 3 cycles.
    # D: x_20 from the prefill and done: 1 token, 0 cycles.
    want = (6 + 2 + 6 + 1, 2 + 1 + 3 + 0)
    assert reference_walk(hits, mask, seq_lens) == want
    assert tuple(sim_accept_sums(hits, mask, seq_end(seq_lens)).tolist()) == want


@pytest.mark.parametrize("seed", range(8))
def test_sim_accept_sums_matches_a_python_walk(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [rng.randint(1, 120) for _ in range(rng.randint(1, 6))]
    num_tokens = sum(seq_lens)
    # Alternating unmasked / masked runs of 1..40 tokens (prompts and replies), and hits
    # from sparse to dense: short and long chains, replies across sequence boundaries.
    runs = []
    while sum(len(r) for r in runs) < num_tokens:
        runs.append(torch.full((rng.randint(1, 40),), len(runs) % 2 == 1))
    mask = torch.cat(runs)[:num_tokens]
    hits = torch.rand(rng.randint(1, 7), num_tokens, generator=gen) < rng.choice([0.3, 0.8, 1.0])
    got = sim_accept_sums(hits, mask, seq_end(seq_lens))
    assert tuple(got.tolist()) == reference_walk(hits, mask, seq_lens)


# ----------------------------------------------------------------- metrics.jsonl


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0,
                                world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()  # other tests expect no default group in this process


def test_metrics_rows_are_written_on_flush(group, tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(Trackers([JsonlTracker(path)]), group=group, device=torch.device("cpu"),
                     num_pairs=1, summarize=lambda v: step_summary(v, 0.5), flush_every_s=3600)
    for step in range(3):
        # A step's sums over two micro-steps: per token, 2 - step CE, hits 5 of 10 and 1 of 4.
        stats = micro_stats([(2.0 - step) * 10, 0.0], [5, 1], [10, 4], sim=(30, 12))
        log.record(step, stats, torch.tensor(1.5), lr=1e-3, tokens=100, seconds=0.5,
                   trainer_wait_s=0.1, engine_wait_s=0.2)
    assert not os.path.exists(path)  # nothing converted before a flush: no host sync
    log.flush()
    rows = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == 2.0 and rows[2]["loss"] == 0.0
    assert rows[0]["acc_0"] == 0.5 and rows[0]["acc_1"] == 0.25 and rows[0]["labels"] == 10
    assert rows[0]["sim_accept_length"] == 2.5 and "accept_length" not in rows[0]
    assert rows[0]["grad_norm"] == 1.5 and rows[0]["tokens"] == 100
    assert rows[0]["tokens_per_s"] == 200 and rows[0]["engine_wait_s"] == 0.2
    assert log.last == rows[-1]


def test_the_logged_rate_is_per_gpu_over_a_window_of_steps(group, tmp_path, monkeypatch):
    # Host end-of-step times 10, 11, 13, 16 s; a window of 2 steps; 2 pairs (GPUs).
    import colocate.metrics as metrics_module

    ends = iter([10.0, 11.0, 13.0, 16.0])
    now = {"t": 0.0}

    def clock():
        return now["t"]

    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(monotonic=clock))
    monkeypatch.setattr(MetricsLog, "WINDOW_STEPS", 2)
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(Trackers([JsonlTracker(path)]), group=group, device=torch.device("cpu"),
                     num_pairs=2, summarize=lambda v: step_summary(v, 0.5), flush_every_s=3600,
                     flops_per_token=1e3, peak=1e6)
    for step, tokens in enumerate([100, 200, 300, 400]):
        now["t"] = next(ends)
        stats = micro_stats([10.0, 0.0], [5, 1], [10, 4], sim=(30, 12))
        log.record(step, stats, torch.tensor(1.0), lr=1e-3, tokens=tokens, seconds=0.01)
    log.flush()
    rows = [json.loads(line) for line in open(path)]
    assert "tokens_per_s_per_gpu" not in rows[0] and "mfu" not in rows[0]
    assert [r["tokens_per_s_per_gpu"] for r in rows[1:]] == pytest.approx([100, 500 / 6, 70])
    assert [r["rate_window_steps"] for r in rows[1:]] == [1, 2, 2]
    assert rows[3]["mfu"] == pytest.approx(0.07)
    assert rows[3]["tokens_per_s"] == pytest.approx(400 / 0.01)  # the step's own, as before



def test_a_timed_steps_rate_comes_from_its_stream_time(group, tmp_path):
    """Marked steps (PhaseTimer; wall-clock marks on CPU, as here) are timed mark to mark:
    the step's own rate and the window's use those times, whatever the host's step_s."""
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(Trackers([JsonlTracker(path)]), group=group, device=torch.device("cpu"),
                     num_pairs=1, summarize=lambda v: step_summary(v, 0.5), flush_every_s=3600)
    # Marks chain: step 1 runs 0 -> 2 s, step 2 runs 2 -> 3 s (the timer keeps the last mark).
    marks = [[("start", 0.0), ("forward", 1.5), ("optimizer", 2.0)],
             [("optimizer", 2.0), ("receive", 2.25), ("forward", 2.75), ("optimizer", 3.0)]]
    for step, (phases, host_s) in enumerate(zip(marks, (0.1, 5.0))):
        stats = micro_stats([10.0, 0.0], [5, 1], [10, 4], sim=(30, 12))
        log.record(step, stats, torch.tensor(1.0), lr=1e-3, tokens=100, seconds=host_s,
                   phases=phases)
    log.flush()
    rows = [json.loads(line) for line in open(path)]
    assert [r["stream_s"] for r in rows] == [2.0, 1.0]
    assert [r["step_s"] for r in rows] == [0.1, 5.0]
    assert [r["tokens_per_s"] for r in rows] == [50.0, 100.0]
    assert [r["tokens_per_s_per_gpu"] for r in rows] == pytest.approx([50.0, 200 / 3.0])
    assert rows[1]["receive_s"] == 0.25 and rows[1]["optimizer_s"] == 0.25


# ----------------------------------------------------------------- FLOPs and references

# H=8, I=16, 2 layers, 2 heads of 4, 1 kv head, vocab 100.
G = Geometry(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
             head_dim=4, vocab_size=100)


def test_geometry_from_hf_config():
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    assert Geometry.from_hf_config(cfg) == G


def test_target_prefill_by_hand():
    # per layer: q 8x8=64, k 8x4=32, v 32, o 64, mlp 3x8x16=384 -> 576 params
    assert G.layer_params() == 576
    # seq 3: average context 2; attention 4 * 2 heads * 4 dims * 2 = 64 per layer
    assert target_prefill_flops_per_token(G, 3) == 2 * (2 * 576 + 64)


def test_draft_by_hand():
    # fc 3*8*8=192; layer reads 2H=16: q 16x8=128, k 16x4=64, v 64, o 64, mlp 384 -> 704;
    # lm_head 8 x 10 = 80
    assert draft_params(G, draft_vocab_size=10) == 192 + 704 + 80
    # unroll 2, seq 3 (context 2): matmul 6*(192 + 2*(704+80)) = 10560;
    # attention 3*(4*2*4*2) + 3*(4*2*4*3) = 192 + 288 = 480; teacher 2*8*100 = 1600
    got = draft_train_flops_per_token(G, 3, draft_vocab_size=10, unroll_steps=2)
    assert got == 10560 + 480 + 1600


def test_mfu_and_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA GB200") == 2500e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("Some GPU") is None
    assert mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)


def test_references():
    refs = disaggregated_references(39000.0, 28000.0)
    assert refs["split_1to1"] == 14000.0
    assert refs["split_ideal"] == pytest.approx(39000 * 28000 / 67000)


def test_qwen3_8b_magnitudes():
    # Qwen3-8B: ~6.95B non-embedding matmul params -> ~13.9 GFLOP/token before attention.
    q8b = Geometry(4096, 12288, 36, 32, 8, 128, 151936)
    assert q8b.num_layers * q8b.layer_params() == pytest.approx(6.95e9, rel=0.01)
    assert target_prefill_flops_per_token(q8b, 2048) == pytest.approx(14.5e9, rel=0.01)
