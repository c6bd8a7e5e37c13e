"""train.epochs with a resume, the trackers of metrics.report_to, and draft.init_from, through
torchrun as a user runs them. One epochs run (stopped and resumed) feeds the warm start."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from colocate.config import load_config
from colocate.data import DataStream, load_or_build_tokenized
from colocate.target import load_tokenizer
from tests.integration.reference_run import reference_losses
from tests.integration.test_train import CONFIG, metrics, tiny_overrides, torchrun_train
from tests.wandb_offline import read_offline_runs

EPOCHS = 2


def hand_count(cfg, cache: str, num_pairs: int = 2):
    """Per pair, by packing with the real stream: the micro-batches that start inside the
    first EPOCHS epochs, and a fresh stream for replaying the run."""
    tokenized = load_or_build_tokenized(cfg.data, load_tokenizer(cfg.target.path),
                                        cfg.target.path, cache)
    streams = []
    for pair in range(num_pairs):
        def stream(pair=pair):
            return DataStream(tokenized, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                              shard_index=pair, num_shards=num_pairs,
                              tokens_per_micro_step=cfg.data.tokens_per_micro_step)
        streams.append(stream)
    counts = []
    for stream in streams:
        s, count = stream(), 0
        while s.state()["epoch"] < EPOCHS:
            s.next_micro_batch()
            count += 1
        counts.append(count)
    return counts, streams


def test_epochs_resume_trackers_and_warm_start(tiny_assets, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(open(tiny_assets["data"]).readlines()[:80]))
    cache, run_dir = str(tmp_path / "cache"), str(tmp_path / "epochs")
    # Small micro-steps so that two epochs of 80 short conversations make a few steps.
    small = [f"data.path={data}", f"data.cache_dir={cache}", "data.tokens_per_micro_step=512"]
    overrides = tiny_overrides(
        tiny_assets, run_dir, *small,
        "train.max_steps=0", f"train.epochs={EPOCHS}", "draft.unroll_steps=2",
        "checkpoint.every_steps=0", "metrics.report_to=[jsonl, tensorboard, wandb]",
        "metrics.wandb_mode=offline")
    first = torchrun_train(overrides + ["train.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-4000:]
    cfg = load_config(CONFIG, overrides)
    counts, streams = hand_count(cfg, cache)
    total = math.ceil(max(counts) / cfg.train.micro_steps)
    assert total > 2, counts  # the stop lands inside the run
    assert (f"train.epochs={EPOCHS}: {total} optimizer steps (" in first.stderr
            and f"packs {max(counts)} micro-batches in {EPOCHS} epoch(s)" in first.stderr)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]

    second = torchrun_train(overrides)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr and f"done: {total - 2} steps" in second.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    # The resumed run went on from the saved epoch position: each pair's stream ends where
    # the real packer is after `total` steps of micro-batches from the start.
    with open(os.path.join(run_dir, "checkpoints", f"step_{total:06d}", "meta.json")) as f:
        meta = json.load(f)
    assert (meta["epochs"], meta["total_steps"]) == (EPOCHS, total)
    for pair, stream in enumerate(streams):
        s = stream()
        for _ in range(total * cfg.train.micro_steps):
            s.next_micro_batch()
        saved = meta["data_states"][pair]
        assert (saved["epoch"], saved["cursor"]) == (s.state()["epoch"], s.state()["cursor"])
    # Rerunning the finished epochs run starts nothing.
    again = torchrun_train(overrides)
    assert again.returncode == 0 and (f"already at step {total} (train.epochs={EPOCHS}, "
                                      f"{total} steps)") in again.stdout

    # Trackers: W&B (offline, both invocations, one run id) and TensorBoard got the rows.
    runs = read_offline_runs(run_dir)
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1
    assert all(r["config"]["train"]["epochs"] == EPOCHS for r in runs)
    logged = {h["step"]: h for r in runs for h in r["history"]}
    assert sorted(logged) == list(range(1, total + 1))
    assert [logged[r["step"]]["loss"] for r in rows] == [r["loss"] for r in rows]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, total + 1))

    # Warm start from the export: the first step's loss is the exported draft's loss on
    # that step's data (the reference run, starting from the same weights), below a random
    # init's on the same data (measured: 9.27 after the 4 steps above, against 11.22).
    export = os.path.join(run_dir, "export")
    warm_dir = str(tmp_path / "warm")
    warm_overrides = tiny_overrides(
        tiny_assets, warm_dir, *small,
        "train.max_steps=1", "draft.unroll_steps=2", f"draft.init_from={export}")
    warm = torchrun_train(warm_overrides)
    assert warm.returncode == 0, warm.stderr[-4000:]
    assert f"draft.init_from: starting from the weights of {export}" in warm.stderr
    weights = {k: v.float() for k, v in load_file(os.path.join(export, "model.safetensors"))
               .items() if k not in ("d2t", "t2d")}
    (want,), _ = reference_losses(load_config(CONFIG, warm_overrides), num_pairs=2,
                                  init_state=weights)
    (got,) = [r["loss"] for r in metrics(warm_dir)]
    assert got == pytest.approx(want, rel=1e-5)
    assert got < 0.9 * rows[0]["loss"]  # the epochs run's first step: a random draft

    # Another shape is refused before any process group, naming the key and both values.
    refused = torchrun_train(tiny_overrides(
        tiny_assets, str(tmp_path / "refused"), *small,
        "train.max_steps=1", f"draft.init_from={export}", "target.aux_layer_ids=[0,2,4]"),
        timeout=60)
    lines = [l for l in refused.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert lines == [f"colocate train: error: [rank 0] draft.init_from {export}/config.json: "
                     "eagle_config.eagle_aux_hidden_state_layer_ids is [1, 2, 3], this run's "
                     "draft has [0, 2, 4]; warm start needs the same (check "
                     "target.aux_layer_ids, or start without draft.init_from)"]
    assert not os.path.exists(str(tmp_path / "refused"))
