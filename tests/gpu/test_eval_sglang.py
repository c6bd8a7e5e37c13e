"""`colocate eval --engine both` on a GPU: sglang's served accept length beside the plain-torch
reference's, same TRAINED export, same prompts.

A random draft cannot tell the two apart (both accept about nothing, and "about 1" agrees
whatever sglang does with the draft), so this test needs a draft that drafts well:

    COLOCATE_TRAINED_EXPORT   an export directory (RUN_DIR/export of a training run)
    COLOCATE_TRAINED_TARGET   the target directory it was trained for
    COLOCATE_TRAINED_DATA     optional: held-out JSONL (default: the tiny data set)

e.g. the tiny target trained on its own answers (`colocate generate`, then `colocate train`
on examples/tiny). Skipped without them, without CUDA or without sglang.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

EXPORT = os.environ.get("COLOCATE_TRAINED_EXPORT", "")
TARGET = os.environ.get("COLOCATE_TRAINED_TARGET", "")

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available()
                       or importlib.util.find_spec("sglang") is None,
                       reason="needs a CUDA GPU and sglang"),
    pytest.mark.skipif(not (EXPORT and TARGET),
                       reason="set COLOCATE_TRAINED_EXPORT and COLOCATE_TRAINED_TARGET"),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, PROMPTS = 4, 32


def test_sglang_and_reference_agree_on_a_trained_draft(tiny_assets, tmp_path):
    assert os.path.isfile(os.path.join(EXPORT, "config.json")), \
        f"COLOCATE_TRAINED_EXPORT={EXPORT}: no config.json there"
    assert os.path.isfile(os.path.join(TARGET, "config.json")), \
        f"COLOCATE_TRAINED_TARGET={TARGET}: no config.json there"
    data = os.environ.get("COLOCATE_TRAINED_DATA") or tiny_assets["data"]
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "colocate", "eval", "--config",
           os.path.join(REPO, "examples", "tiny", "config.yaml"), "--draft", EXPORT,
           "--out", str(out), "--data", data, "--engine", "both", "--limit", str(PROMPTS),
           "--steps", str(STEPS), "--max-new-tokens", "128", f"target.path={TARGET}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["engine"] == "sglang" and set(result["runs"]) == {"hf", "sglang"}
    for name, run in result["runs"].items():
        assert run["num_prompts"] == PROMPTS, name
        assert len(run["histogram"]) == STEPS + 1, name
        assert sum(run["histogram"]) == run["verify_steps"], name
        assert run["accept_length"] == run["completion_tokens"] / run["verify_steps"], name
        # A trained draft: well above the ~1 of a random one.
        assert run["accept_length"] > 1.3, (name, run["accept_length"], proc.stdout)
    # Same draft, same greedy target (both bf16): equal up to near-tie flips between the
    # two implementations.
    assert abs(result["accept_length_rel_diff"]) < 0.05, proc.stdout
