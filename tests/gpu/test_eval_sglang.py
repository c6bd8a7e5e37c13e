"""`colocate eval --engine both` on a GPU: sglang's served accept length beside the plain-torch
reference's, same export, same prompts (skipped without CUDA or sglang)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.eval_exports import write_random_export

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
    reason="needs a CUDA GPU and sglang")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sglang_and_reference_agree(tiny_assets, tmp_path):
    export = write_random_export(tiny_assets["target_llama"], str(tmp_path / "export"))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "colocate", "eval", "--config",
           os.path.join(REPO, "examples", "tiny", "config.yaml"), "--draft", export,
           "--out", str(out), "--data", tiny_assets["data"], "--engine", "both", "--limit", "8",
           "--steps", "4", "--max-new-tokens", "64", f"target.path={tiny_assets['target_llama']}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["engine"] == "sglang" and set(result["runs"]) == {"hf", "sglang"}
    sgl = result["runs"]["sglang"]
    assert sgl["accept_length"] == sgl["completion_tokens"] / sgl["verify_steps"]
    assert sum(sgl["histogram"]) == sgl["verify_steps"] and len(sgl["histogram"]) == 5
    assert set(sgl["tokens_per_s"]) == {"batch_1", "batch_8"}
    # Same draft, same greedy target (both bf16 on the GPU): the accept lengths agree up to
    # near-tie flips between the two implementations.
    assert abs(result["accept_length_rel_diff"]) < 0.1, proc.stdout
