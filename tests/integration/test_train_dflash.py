"""Colocated DFlash training on CPU with torchrun (4 ranks: two trainer/engine pairs): the loss
falls, a stopped-and-resumed run equals the straight one, and the export is what the
reference decoder serves losslessly."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.integration.test_train import REPO, metrics, tiny_overrides, torchrun_train

DFLASH = ["draft.method=dflash", "draft.num_layers=1", "draft.block_size=4",
          "draft.num_anchors=16", "data.tokens_per_micro_step=512", "train.lr=3e-3",
          "train.warmup_steps=2", "checkpoint.every_steps=0"]


def _overrides(tiny_assets, run_dir, *extra):
    # The Qwen3 target: DFlash's draft layers are Qwen3-style (q/k norms).
    return [*tiny_overrides(tiny_assets, run_dir, *DFLASH, *extra),
            f"target.path={tiny_assets['target_qwen3']}"]


@pytest.fixture(scope="module")
def dflash_runs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash")
    straight, resumed = str(root / "straight"), str(root / "resumed")
    proc = torchrun_train(_overrides(tiny_assets, straight, "train.max_steps=8"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    first = torchrun_train(_overrides(tiny_assets, resumed, "train.max_steps=8",
                                      "train.stop_at_step=4"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = torchrun_train(_overrides(tiny_assets, resumed, "train.max_steps=8"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    return straight, resumed


def test_dflash_loss_falls_and_block_accuracy_rises(dflash_runs):
    rows = metrics(dflash_runs[0])
    assert [r["step"] for r in rows] == list(range(1, 9))
    # block positions 1..3 are reported as acc_0..acc_2; K = block_size - 1 = 3
    assert "acc_2" in rows[0] and "acc_3" not in rows[0]
    # Measured on CPU: loss 7.07 -> 6.21 over 8 steps of two pairs.
    assert rows[-1]["loss"] < 0.92 * rows[0]["loss"]
    assert rows[-1]["acc_0"] > rows[0]["acc_0"]
    assert 1.0 <= rows[-1]["sim_accept_length"] <= 4.0


def test_dflash_resume_is_exact(dflash_runs):
    straight, resumed = (metrics(d) for d in dflash_runs)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    # Same anchors (drawn from seed, step, micro-step, data shard) and same data after the resume.
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight],
                                                         rel=1e-6, abs=1e-6)
    assert [r["labels"] for r in resumed] == [r["labels"] for r in straight]


def test_dflash_export_serves_losslessly_in_the_reference_decoder(dflash_runs, tiny_assets,
                                                                  tmp_path):
    export = os.path.join(dflash_runs[0], "export")
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    weights = load_file(os.path.join(export, "model.safetensors"))
    assert weights["fc.weight"].shape == (128, 3 * 128)  # examples/tiny: aux_layer_ids [1,2,3]
    out = str(tmp_path / "eval.json")
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", "eval", "--config",
         os.path.join(dflash_runs[0], "config.yaml"), "--draft", export, "--engine", "hf",
         "--out", out, "eval.num_prompts=4", "eval.max_new_tokens=24", "data.holdout=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    hf = result["runs"]["hf"]
    assert hf["same_output_as_target"] == result["num_prompts"] == 4  # greedy: lossless
    assert 1.0 <= result["accept_length"] <= 4.0  # at most the block: bonus + 3 drafts
