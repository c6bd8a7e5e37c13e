"""`python -m colocate eval` as a user runs it: the hf reference end to end on CPU, and one
readable line for each input mistake."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.chat_templates import FAILING_TEMPLATE
from tests.eval_exports import write_random_export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny", "config.yaml")


def run_eval(target, draft, out, *args, timeout=240):
    cmd = [sys.executable, "-m", "colocate", "eval", "--config", CONFIG, "--draft", str(draft),
           "--out", str(out), f"target.path={target}", "run.device=cpu", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("COLOCATE_DEBUG", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def export(tiny_assets, tmp_path_factory):
    return write_random_export(tiny_assets["target_llama"], str(tmp_path_factory.mktemp("e")))


def test_eval_hf_end_to_end(tiny_assets, export, tmp_path):
    out = tmp_path / "res" / "eval.json"
    proc = run_eval(tiny_assets["target_llama"], export, out, "--data", tiny_assets["data"],
                    "--limit", "6", "--engine", "hf", "--steps", "3", "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert os.listdir(out.parent) == ["eval.json"]  # no temporary file left beside it
    assert result["engine"] == "hf" and list(result["runs"]) == ["hf"]
    assert result["num_prompts"] == 6 and result["steps"] == 3
    assert result["max_new_tokens"] == 32 and result["num_skipped_too_long"] == 0
    hf = result["runs"]["hf"]
    for key in ("accept_length", "histogram", "completion_tokens", "verify_steps"):
        assert result[key] == hf[key], key
    assert result["accept_length"] == result["completion_tokens"] / result["verify_steps"]
    assert 1 <= result["accept_length"] <= 3 + 1
    assert len(result["histogram"]) == 4 and sum(result["histogram"]) == result["verify_steps"]
    # Every prompt ends by stop token or after 32 tokens; a verify step adds 1..4 of them
    # and the prompt's first token comes from the prefill.
    assert result["completion_tokens"] <= 6 * 32
    assert result["verify_steps"] >= (result["completion_tokens"] - 6) / 4
    rates = hf["tokens_per_s"]["batch_1"]
    assert rates["with_draft"] > 0 and rates["without_draft"] > 0
    assert rates["speedup"] == pytest.approx(rates["with_draft"] / rates["without_draft"])
    assert hf["same_output_as_target"] == 6  # lossless
    assert "hf" in proc.stdout and f"wrote {out}" in proc.stdout


def one_error_line(proc):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [l for l in lines if l.startswith("colocate eval: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_missing_export_files(tiny_assets, export, tmp_path):
    line = one_error_line(run_eval(tiny_assets["target_llama"], tmp_path / "nope",
                                   tmp_path / "o.json", "--data", tiny_assets["data"]))
    assert f"--draft {tmp_path / 'nope'}: no such directory" in line
    partial = tmp_path / "partial"
    shutil.copytree(export, partial)
    os.remove(partial / "model.safetensors")
    line = one_error_line(run_eval(tiny_assets["target_llama"], partial, tmp_path / "o.json",
                                   "--data", tiny_assets["data"]))
    assert f"--draft {partial}: no model.safetensors" in line
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("key,value,message", [
    ("vocab_size", 999, "vocab_size 999 but the target"),
    ("target_hidden_size", 256, "hidden_size 256 but the target"),
    ("eagle_config", {"eagle_aux_hidden_state_layer_ids": [1, 2, 9]},
     "aux layer ids [9] do not exist in the target"),
])
def test_draft_for_another_target(tiny_assets, export, tmp_path, key, value, message):
    other = tmp_path / "other"
    shutil.copytree(export, other)
    config = json.loads((other / "config.json").read_text())
    config[key] = value
    (other / "config.json").write_text(json.dumps(config))
    line = one_error_line(run_eval(tiny_assets["target_llama"], other, tmp_path / "o.json",
                                   "--data", tiny_assets["data"]))
    assert f"{other / 'config.json'}: {message}" in line
    assert "exported for another target" in line and "target.path" in line


def test_no_usable_prompt(tiny_assets, export, tmp_path):
    data = tmp_path / "replies_only.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n")
    # A reply without a prompt is malformed (role order); skipped, nothing usable is left.
    line = one_error_line(run_eval(tiny_assets["target_llama"], export, tmp_path / "o.json",
                                   "data.skip_invalid=true", "--data", str(data),
                                   "--engine", "hf"))
    assert f"{data}: no usable prompt" in line


def test_no_data_without_a_holdout_split(tiny_assets, export, tmp_path):
    line = one_error_line(run_eval(tiny_assets["target_llama"], export, tmp_path / "o.json",
                                   f"data.path={tiny_assets['data']}", "data.holdout=0",
                                   "--engine", "hf"))
    assert "data.holdout is 0" in line and "set --data or eval.data" in line


def test_the_holdout_split_is_the_default_prompts(tiny_assets, export, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_eval(tiny_assets["target_llama"], export, out, f"data.path={tiny_assets['data']}",
                    "data.holdout=5", "--engine", "hf", "--steps", "2", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # eval.num_prompts is 48: only the 5 held-out conversations are there to decode.
    assert result["num_prompts"] == 5 and "data.holdout split" in result["data"]


def short_context_target(tiny_assets, tmp_path, context):
    """The tiny target with a smaller max_position_embeddings (same weights)."""
    target = tmp_path / "short-target"
    shutil.copytree(tiny_assets["target_llama"], target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = context
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_prompts_longer_than_the_context(tiny_assets, export, tmp_path):
    target = short_context_target(tiny_assets, tmp_path, context=48)
    data = tmp_path / "mixed.jsonl"
    rows = [[("user", "What is 2 + 3?")], [("user", " ".join(["apple banana cherry"] * 12))],
            [("user", "Count from 1 to 5.")]]
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]
                                        + [{"role": "assistant", "content": "ok"}]}) + "\n"
                            for turns in rows))
    out = tmp_path / "eval.json"
    proc = run_eval(target, export, out, "--data", str(data), "--engine", "hf",
                    "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 2 and result["num_skipped_too_long"] == 1
    assert "(skipped: 1 too long, 0 unrenderable)" in proc.stdout
    # With room for no prompt at all: one line naming the data and the fix.
    line = one_error_line(run_eval(target, export, out, "--data", str(data), "--engine", "hf",
                                   "--max-new-tokens", "44"))
    assert f"{data}: all 3 prompts are longer than the target's context (48) minus " \
           "eval.max_new_tokens (44)" in line


def test_limit_counts_usable_prompts_and_every_skip_is_counted(tiny_assets, export, tmp_path):
    target = short_context_target(tiny_assets, tmp_path, context=48)
    template = tmp_path / "failing.jinja"
    template.write_text(FAILING_TEMPLATE)
    users = [" ".join(["apple banana cherry"] * 12), "FAIL here", "What is 2 + 3?",
             "Count from 1 to 5.", "Name a color."]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": "ok"}]})
                            + "\n" for u in users))
    out = tmp_path / "eval.json"
    proc = run_eval(target, export, out, f"data.chat_template={template}", "--data", str(data),
                    "--engine", "hf", "--limit", "2", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # Two usable prompts decoded although the first two conversations give none.
    assert result["num_prompts"] == 2
    assert result["num_skipped_too_long"] == 1 and result["num_skipped_unrenderable"] == 1
    assert "(skipped: 1 too long, 1 unrenderable)" in proc.stdout
    assert "cannot render FAIL" in proc.stderr  # the skip is logged with its reason


def test_bad_eval_setting_names_the_key(tiny_assets, export, tmp_path):
    line = one_error_line(run_eval(tiny_assets["target_llama"], export, tmp_path / "o.json",
                                   "--data", tiny_assets["data"], "--steps", "0"))
    assert "eval.steps: got 0" in line
