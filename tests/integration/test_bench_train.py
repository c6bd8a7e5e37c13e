"""`colocate bench train` on CPU: every column printed, MPS modes reported as unavailable."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_train_cpu_prints_every_column(tiny_assets, tmp_path):
    cmd = [sys.executable, "-m", "colocate", "bench", "train", "--config",
           "examples/tiny/config.yaml", f"target.path={tiny_assets['target_llama']}",
           f"data.path={tiny_assets['data']}", f"data.cache_dir={tmp_path / 'cache'}",
           "--steps", "5", "--warmup", "2", "--workdir", str(tmp_path / "bench")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, breakdown = proc.stdout.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[1].split() == ["mode", "tok/s/GPU", "MFU", "vs", "ts", "vs", "ideal", "vs",
                                "1:1", "T", "wait", "E", "wait", "handoff", "T", "GiB", "E",
                                "GiB"]
    rows = {l[:20].strip(): l[20:].split() for l in lines[2:]}
    for mode in ("colocated MPS K=2", "colocated MPS K=3", "serial MPS K=1"):
        assert rows[mode] == ["unavailable:", "MPS", "needs", "a", "CUDA", "GPU"]
    for mode in ("time-sliced K=2", "engine alone (E)", "trainer alone (T)"):
        assert len(rows[mode]) == 10 and float(rows[mode][0].replace(",", "")) > 0
    assert rows["time-sliced K=2"][2] == "1.00x"
    e = float(rows["engine alone (E)"][0].replace(",", ""))
    t = float(rows["trainer alone (T)"][0].replace(",", ""))
    ideal = float(rows["ideal split (ref)"][0].replace(",", ""))
    assert abs(ideal - e * t / (e + t)) <= 1.0  # rounding of the printed numbers
    assert os.path.isfile(tmp_path / "bench" / "table.txt")
    b_lines = breakdown.splitlines()
    assert b_lines[1].split() == ["mode", "E", "prefill", "T", "receive", "T", "teacher", "T",
                                  "forward", "T", "backward", "T", "optimizer"]
    shares = {l[:20].strip(): [float(x.rstrip("%")) for x in l[20:].split()] for l in b_lines[2:]}
    assert set(shares) == {"time-sliced K=2", "engine alone (E)", "trainer alone (T)"}
    assert shares["trainer alone (T)"][0] == 0.0          # replay: the engine never prefills
    assert shares["time-sliced K=2"][0] > 0               # a real engine did
    assert shares["engine alone (E)"][3:5] == [0.0, 0.0]  # discard: no forward, no backward
    assert 50 < sum(shares["trainer alone (T)"][1:]) < 110  # phases cover the step


def test_bench_train_sweep_runs_each_value(tiny_assets, tmp_path):
    """--sweep: one row per (value, mode), run with that value (the micro-step budget here:
    a 512-token budget packs fewer tokens per step than 1024)."""
    cmd = [sys.executable, "-m", "colocate", "bench", "train", "--config",
           "examples/tiny/config.yaml", f"target.path={tiny_assets['target_llama']}",
           f"data.path={tiny_assets['data']}", f"data.cache_dir={tmp_path / 'cache'}",
           "--steps", "3", "--warmup", "1", "--modes", "k3,trainer", "--workdir",
           str(tmp_path / "bench"), "--sweep", "data.tokens_per_micro_step=512,1024"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().split("\n\n")[0].splitlines()
    width = lines[1].index("tok/s/GPU") - 2  # mode column, a space, " tok/s/GPU" (10 wide)
    rows = {l[:width].strip(): l[width:].split() for l in lines[2:]}
    assert set(rows) == {f"{mode} tokens_per_micro_step={v}" for v in (512, 1024)
                         for mode in ("colocated MPS K=3", "trainer alone (T)")}
    assert rows["colocated MPS K=3 tokens_per_micro_step=512"][0] == "unavailable:"
    for v in (512, 1024):
        metrics = [json.loads(l) for l in open(tmp_path / "bench" / f"trainer-tokens_per_micro_step-{v}"
                                                / "metrics.jsonl")]
        assert all(0 < r["tokens"] <= 2 * v for r in metrics)  # 2 micro-steps per step
        clocks = [r["engine_clock_s"] for r in metrics]  # the engine's own timeline
        assert clocks == sorted(clocks) and clocks[-1] > clocks[0] > 0
    bad = subprocess.run(cmd[:-1] + ["draft.no_such_key=1"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "draft.no_such_key" in bad.stderr


def test_bench_train_online_decode_against_pregenerated(tiny_assets, tmp_path):
    """--modes pregen,online: the answers are generated first for the pregen row; the
    online row decodes them while training and reports the decode rate and the ratio."""
    prompts = tmp_path / "prompts.jsonl"
    with open(tiny_assets["data"]) as f:
        prompts.write_text("".join(next(f) for _ in range(40)))
    cmd = [sys.executable, "-m", "colocate", "bench", "train", "--config",
           "examples/tiny/config.yaml", f"target.path={tiny_assets['target_llama']}",
           f"data.path={prompts}", f"data.cache_dir={tmp_path / 'cache'}", "data.holdout=0",
           "generate.max_new_tokens=32", "generate.chunk_records=8", "--steps", "4",
           "--warmup", "1", "--modes", "pregen,online", "--workdir", str(tmp_path / "bench")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip().split("\n\n")[0].splitlines()
    rows = {l[:20].strip(): l[20:].split() for l in table[2:]}
    for mode in ("pre-generated K=2", "online decode K=2"):
        assert float(rows[mode][0].replace(",", "")) > 0
    decode = next(l for l in table if l.startswith("online decode: the target generated"))
    assert float(decode.split()[5].replace(",", "")) > 0
    assert any(l.startswith("online / pre-generated: ") and "x tokens/s" in l for l in table)
    online = [json.loads(l) for l in open(tmp_path / "bench" / "online" / "metrics.jsonl")]
    pregen = [json.loads(l) for l in open(tmp_path / "bench" / "pregen" / "metrics.jsonl")]
    # The same answers either way: the same tokens trained, step by step.
    assert [r["step_ids_crc32"] for r in online] == [r["step_ids_crc32"] for r in pregen]


def test_bench_train_on_two_gpus_reports_per_gpu_rates_and_scaling(tiny_assets, tmp_path):
    """--gpus 1,2 (on CPU: 2 and 4 ranks): each row's rate is per pair, as the rows of
    metrics.jsonl say, and a scaling line compares two with one."""
    cmd = [sys.executable, "-m", "colocate", "bench", "train", "--config",
           "examples/tiny/config.yaml", f"target.path={tiny_assets['target_llama']}",
           f"data.path={tiny_assets['data']}", f"data.cache_dir={tmp_path / 'cache'}",
           "--steps", "3", "--warmup", "1", "--modes", "ts", "--gpus", "1,2", "--workdir",
           str(tmp_path / "bench")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip().split("\n\n")[0]
    lines = table.splitlines()
    width = lines[1].index("tok/s/GPU") - 2
    rates = {l[:width].strip(): float(l[width:].split()[0].replace(",", ""))
             for l in lines[2:] if l.startswith("time-sliced")}
    assert set(rates) == {"time-sliced K=2 gpus=1", "time-sliced K=2 gpus=2"}
    for gpus in (1, 2):
        rows = [json.loads(l) for l in open(tmp_path / "bench" / f"ts-gpus-{gpus}" /
                                             "metrics.jsonl")]
        # After the warm-up step, less the last (the engine's lead: 2 slots, 2 micro-steps
        # a step), over the trainer's stream time (on CPU, its wall clock mark to mark).
        timed = rows[1:-1]
        want = sum(r["tokens"] for r in timed) / gpus / sum(r["stream_s"] for r in timed)
        assert abs(rates[f"time-sliced K=2 gpus={gpus}"] - want) <= 1.0  # printed rounded
    scaling = [l for l in lines if l.startswith("scaling, ")]
    head = (f"scaling, time-sliced K=2 gpus=2: {rates['time-sliced K=2 gpus=2']:,.0f} tok/s "
            "per GPU = ")
    tail = f"% of one GPU's {rates['time-sliced K=2 gpus=1']:,.0f}"
    assert len(scaling) == 1 and scaling[0].startswith(head) and scaling[0].endswith(tail)
    # The share comes from the unrounded rates: from the printed ones it may differ by 0.1.
    share = 100 * rates["time-sliced K=2 gpus=2"] / rates["time-sliced K=2 gpus=1"]
    assert abs(float(scaling[0][len(head):-len(tail)]) - share) <= 0.11
