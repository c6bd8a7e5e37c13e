"""Colocated Eagle3 training on CPU, started with torchrun exactly as a user would."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from colocate.config import load_config
from tests.integration.reference_run import reference_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny", "config.yaml")


def tiny_overrides(tiny_assets, run_dir, *extra):
    # No held-out split or validation unless a test asks: the bundled data as it is.
    return [f"target.path={tiny_assets['target_llama']}", f"data.path={tiny_assets['data']}",
            f"run.dir={run_dir}", "run.device=cpu", "train.log_every_s=0.5", "data.holdout=0",
            "train.val_every_steps=0", *extra]


def torchrun_train(overrides, nproc=4, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "colocate", "train", "--config", CONFIG, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tiny_assets, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run") / "tiny")
    proc = torchrun_train(tiny_overrides(tiny_assets, run_dir, "train.max_steps=24",
                                         "checkpoint.every_steps=10"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


def test_loss_falls_and_acc_rises(tiny_run):
    run_dir, proc = tiny_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = rows[0], rows[-4:]
    # Measured on CPU (per-token metrics, the trained tiny target, loss summed over the
    # unrolled steps): loss 18.5 -> 10.5, acc_0 0.00 -> 0.38 and sim_accept_length
    # 1.09 -> 1.67 over 24 steps (mean of the last four steps). Out-of-vocabulary targets
    # count as misses.
    assert sum(r["loss"] for r in last) / 4 < 0.65 * first["loss"]
    assert first["acc_0"] < 0.05
    assert sum(r["acc_0"] for r in last) / 4 > 0.3
    assert sum(r["sim_accept_length"] for r in last) / 4 > 1.5 > first["sim_accept_length"]
    assert all(r["labels"] > 1000 for r in rows)  # two pairs x two micro-steps of labels
    assert "step 24/24" in proc.stdout and "done: 24 steps" in proc.stdout
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_export_matches_the_trained_draft(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 512 and config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["tie_word_embeddings"] is False
    weights = load_file(os.path.join(export, "model.safetensors"))
    assert weights["d2t"].shape == (512,) and weights["t2d"].sum().item() == 512
    draft_ids = weights["d2t"] + torch.arange(512)
    assert weights["t2d"][draft_ids].all()
    assert weights["fc.weight"].shape == (128, 3 * 128)

    # The same checkpoint re-exported by the command, and the raw DCP weights, agree.
    out = str(tmp_path / "again")
    proc = subprocess.run([sys.executable, "-m", "colocate", "export", run_dir, out], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    card = open(os.path.join(out, "README.md")).read()  # out lies outside the run dir
    assert f"| run | `{run_dir}` |" in card and "| steps | 24 optimizer steps," in card
    again = load_file(os.path.join(out, "model.safetensors"))
    assert again.keys() == weights.keys()
    for name in weights:
        assert torch.equal(again[name], weights[name]), name

    from colocate.draft.recipe import recipe_for
    from colocate.export import load_checkpoint_weights
    from colocate.train.checkpoint import list_checkpoints
    from transformers import AutoConfig

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    _, model = recipe_for(cfg).build_model(AutoConfig.from_pretrained(cfg.target.path),
                                           weights["d2t"].numel(), [1, 2, 3])
    trained = load_checkpoint_weights(list_checkpoints(run_dir)[-1], model)
    for name, tensor in trained.items():
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name
    assert len(list_checkpoints(run_dir)) == 2  # keep_last


def test_losses_match_single_process_reference(tiny_assets, tmp_path):
    run_dir = str(tmp_path / "parity")
    overrides = tiny_overrides(tiny_assets, run_dir, "train.max_steps=5", "draft.unroll_steps=3")
    proc = torchrun_train(overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    got = [r["loss"] for r in rows]
    cfg = load_config(CONFIG, overrides)
    want, want_norms = reference_losses(cfg, num_pairs=2)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) > 1  # the steps really differ
    # The gradient itself, not only its direction (AdamW would hide a constant factor,
    # such as FSDP's average over trainers left uncompensated): its norm before clipping.
    assert [r["grad_norm"] for r in rows] == pytest.approx(want_norms, rel=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tiny_assets, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = ["train.max_steps=6", "draft.unroll_steps=2", "checkpoint.every_steps=0"]
    assert torchrun_train(tiny_overrides(tiny_assets, straight, *common)).returncode == 0
    first = torchrun_train(tiny_overrides(tiny_assets, resumed, *common, "train.stop_at_step=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3]
    second = torchrun_train(tiny_overrides(tiny_assets, resumed, *common))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-6)
    assert [r["acc_0"] for r in b] == pytest.approx([r["acc_0"] for r in a], abs=1e-6)


def test_resume_after_a_lost_checkpoint_rewrites_no_metrics_row(tiny_assets, tmp_path):
    # A run whose last checkpoint (step 6) never landed, as if killed after writing rows
    # 4..6: the rerun resumes at step 3 and metrics.jsonl holds each step once, rows 4..6
    # being the rerun's (equal to the first run's: resume is exact).
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_assets, run_dir, "train.max_steps=6", "draft.unroll_steps=2",
                               "checkpoint.every_steps=3")
    assert torchrun_train(overrides).returncode == 0
    first = metrics(run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_000006"))
    proc = torchrun_train(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_000003" in proc.stderr
    again = metrics(run_dir)
    assert [r["step"] for r in again] == list(range(1, 7))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in first], rel=1e-6)
    assert again[:3] == first[:3]  # kept as written


def test_bad_config_fails_fast_with_one_line(tiny_assets, tmp_path):
    proc = torchrun_train(tiny_overrides(tiny_assets, str(tmp_path / "x"), "train.max_stepz=3"),
                          timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert lines == ["colocate train: error: [rank 0] train.max_stepz: unknown key; did you "
                     "mean train.max_steps? (valid: max_steps, epochs, stop_at_step, "
                     "micro_steps, lr, min_lr_ratio, warmup_steps, weight_decay, betas, "
                     "grad_clip, log_every_s, val_every_steps, tensorboard, max_nonfinite_steps, "
                     "sp_size)"]
    # No rank prints a traceback (torchrun's own launcher summary still does).
    assert not any(l.startswith("[rank") and "Traceback" in l for l in proc.stderr.splitlines())
    # torchrun's summary names rank 0's error as the root cause, with the bad-input status;
    # the other ranks (same error) are followers.
    root = proc.stderr.split("Root Cause")[1]
    assert "rank      : 0" in root and "exitcode  : 2" in root
    assert "traceback : colocate train: error: [rank 0] train.max_stepz: unknown key" in root
    assert "To enable traceback" not in proc.stderr


def test_missing_model_fails_fast(tiny_assets, tmp_path):
    proc = torchrun_train(tiny_overrides(tiny_assets, str(tmp_path / "x"),
                                         f"target.path={tmp_path / 'nope'}"), timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert len(lines) == 1 and "target.path" in lines[0] and "no config.json" in lines[0]


def test_malformed_data_names_file_and_line(tiny_assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = open(tiny_assets["data"]).read().splitlines()[:20]
    bad.write_text("\n".join(good[:5] + ["{not json"] + good[5:]) + "\n")
    proc = torchrun_train(tiny_overrides(tiny_assets, str(tmp_path / "x"), f"data.path={bad}",
                                         f"data.cache_dir={tmp_path / 'cache'}"), timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert lines and all(f"{bad}:6" in l for l in lines), proc.stderr[-3000:]


def test_prepare_vocab_fills_the_caches_training_uses(tiny_assets, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "colocate", "prepare-vocab", "--config", CONFIG,
           f"target.path={tiny_assets['target_llama']}", f"data.path={tiny_assets['data']}",
           f"data.cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "500 lines -> 452 conversations (48 held out;" in proc.stdout and "draft vocabulary: 512 of" in proc.stdout
    names = sorted(p.name for p in cache.iterdir())
    # The held-out split is cached apart from the training split.
    prefixes = ["tokenized-holdout-", "tokenized-train-", "vocab-"]
    assert len(names) == 3 and all(n.startswith(p) for n, p in zip(names, prefixes)), names


def test_resume_on_more_pairs_names_both_counts(tiny_assets, tmp_path):
    run_dir = str(tmp_path / "grow")
    common = ["train.max_steps=4", "draft.unroll_steps=2"]
    first = torchrun_train(tiny_overrides(tiny_assets, run_dir, *common, "train.stop_at_step=1"),
                           nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun_train(tiny_overrides(tiny_assets, run_dir, *common), nproc=4)
    assert second.returncode != 0
    lines = [l for l in second.stderr.splitlines() if l.startswith("colocate train: error:")]
    assert lines and "written by 1 trainer/engine pair(s), this run has 2" in lines[0]
    assert "checkpoint.resume=never" in lines[0]


def test_validation_on_the_held_out_split(tiny_assets, tmp_path):
    from colocate.data import load_or_build_tokenized
    from colocate.target import load_tokenizer

    run_dir = str(tmp_path / "val")
    cache = str(tmp_path / "cache")
    overrides = tiny_overrides(tiny_assets, run_dir, "train.max_steps=6", "draft.unroll_steps=3",
                               "data.holdout=48", "train.val_every_steps=4",
                               f"data.cache_dir={cache}")
    proc = torchrun_train(overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    validated = [r["step"] for r in rows if "val_loss" in r]
    assert validated == [4, 6]  # every 4 steps and after the last
    assert "validation after step 4:" in proc.stdout and "validation after step 6:" in proc.stdout
    assert "48 held out" in proc.stderr
    # Every held-out conversation was evaluated once, over both pairs: the step-0 labels of
    # the held-out split, counted here independently (label t+2 inside its sequence, masked).
    cfg = load_config(CONFIG, overrides)
    held_out = load_or_build_tokenized(cfg.data, load_tokenizer(cfg.target.path),
                                       cfg.target.path, cache, split="holdout")
    assert held_out.num_sequences == 48
    expected = sum(int(held_out.sequence(i)[1][2:].sum()) for i in range(48))
    for row in rows:
        if "val_loss" in row:
            assert row["val_labels"] == expected
            assert 1.0 <= row["val_sim_accept_length"] <= 3 + 1
            assert 0.0 <= row["val_acc_0"] <= 1.0 and row["val_loss"] > 0
    # The draft learned between the two validations, on the held-out data too.
    first, last = (r for r in rows if "val_loss" in r)
    assert last["val_loss"] < first["val_loss"]
    # Validation is forward only: the same run without it trains exactly the same.
    plain_dir = str(tmp_path / "plain")
    plain = torchrun_train([o.replace(run_dir, plain_dir) for o in overrides
                            if not o.startswith("train.val_every_steps")])
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert [r["loss"] for r in metrics(plain_dir)] == [r["loss"] for r in rows]


def test_served_evals_during_and_after_training(tiny_assets, tmp_path):
    run_dir = str(tmp_path / "evals")
    proc = torchrun_train(tiny_overrides(
        tiny_assets, run_dir, "train.max_steps=6", "draft.unroll_steps=3", "data.holdout=8",
        "train.val_every_steps=3", "eval.every_steps=3", "eval.at_end=true", "eval.engine=hf",
        "eval.num_prompts=4", "eval.steps=3", "eval.max_new_tokens=12",
        f"data.cache_dir={tmp_path / 'cache'}"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(run_dir, "evals.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert sorted(r["step"] for r in rows) == [3, 6]
    val = {r["step"]: r["val_sim_accept_length"] for r in metrics(run_dir) if "val_loss" in r}
    for row in rows:
        with open(row["eval_json"]) as f:
            result = json.load(f)
        assert result["engine"] == "hf" and result["num_prompts"] == 4 and result["steps"] == 3
        assert row["accept_length"] == result["accept_length"]
        assert row["accept_length"] == result["completion_tokens"] / result["verify_steps"]
        assert row["val_sim_accept_length"] == val[row["step"]]
    assert os.path.isdir(os.path.join(run_dir, "evals", "step_00000003", "export"))
    assert proc.stdout.count("served eval after step") == 2
