"""Online decode through torchrun: 4 ranks train on the tiny target's answers as its engines
decode them (hf, greedy), stopped and resumed halfway, and see exactly the tokens and losses
of training on the file `colocate generate` writes for the same prompts."""

import os
import subprocess
import sys

import pytest

from tests.integration.test_train import CONFIG, REPO, metrics, tiny_overrides, torchrun_train

# Full draft vocabulary: online decode picks it from data.path's own replies, training on the
# generated file from the answers; at the target's size both are every token.
SHARED = ("draft.draft_vocab_size=1102", "data.max_length=96", "data.tokens_per_micro_step=384",
          "generate.engine=hf", "generate.max_new_tokens=48", "train.max_steps=4")


def test_online_training_equals_training_on_the_generated_file(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(tiny_assets["data"]) as f:
        prompts.write_text("".join(next(f) for _ in range(40)))
    answers = str(tmp_path / "answers.jsonl")
    target = f"target.path={tiny_assets['target_llama']}"
    gen = subprocess.run(
        [sys.executable, "-m", "colocate", "generate", "--config", CONFIG, "--data",
         str(prompts), "--out", answers, target, "run.device=cpu", *SHARED],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]

    offline_dir = str(tmp_path / "offline")
    proc = torchrun_train(tiny_overrides(tiny_assets, offline_dir, *SHARED,
                                         f"data.path={answers}"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    online_dir = str(tmp_path / "online")
    online = tiny_overrides(tiny_assets, online_dir, *SHARED, f"data.path={prompts}",
                            "data.source=generate", "generate.chunk_records=8",
                            "checkpoint.every_steps=2")
    first = torchrun_train(online + ["train.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun_train(online)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr

    offline_rows, online_rows = metrics(offline_dir), metrics(online_dir)
    assert [r["step"] for r in online_rows] == [1, 2, 3, 4]
    # The same tokens, step by step (the first pair's fingerprint), and the same losses.
    assert [r["step_ids_crc32"] for r in online_rows] == \
        [r["step_ids_crc32"] for r in offline_rows]
    assert [r["loss"] for r in online_rows] == \
        pytest.approx([r["loss"] for r in offline_rows], rel=1e-5)
    # Answers that would pass the 96-token training length were cut there and counted.
    assert online_rows[-1]["decode_truncated"] > 0
    assert online_rows[-1]["decode_tokens"] > 0 and "decode_tokens" not in offline_rows[-1]
