"""What a user types, through the real CLI: numbers as written (1e-3, 1_000, 1e3) and
relative paths resolved from the user's working directory, with errors saying where they
looked (issue 16, item 3)."""

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "examples", "tiny", "config.yaml")


def colocate(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "colocate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_numbers_and_relative_paths_from_the_users_directory(tiny_assets, tmp_path):
    work = tmp_path / "elsewhere"  # not the repository: relative paths mean this directory
    work.mkdir()
    common = ["--config", CONFIG, f"target.path={tiny_assets['target_llama']}",
              "train.lr=1e-3", "train.max_steps=1_000", "train.warmup_steps=1e1",
              "run.dir=runs/mine", "data.holdout=0", "train.val_every_steps=0"]

    missing = colocate("prepare-vocab", *common, "data.path=data/conv.jsonl", cwd=work)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert (f"data.path: data/conv.jsonl (looked for {work}/data/conv.jsonl; relative paths "
            f"resolve from the working directory {work}) is not a file") in missing.stderr
    assert "Traceback" not in missing.stderr

    (work / "data").mkdir()
    shutil.copy(tiny_assets["data"], work / "data" / "conv.jsonl")
    ok = colocate("prepare-vocab", *common, "data.path=data/conv.jsonl", cwd=work)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "draft vocabulary: 512 of" in ok.stdout
    assert any(n.startswith("tokenized-train-") for n in os.listdir(work / "runs" / ".cache"))


def test_role_order_is_named_and_skippable(tiny_assets, tmp_path):
    lines = open(tiny_assets["data"]).read().splitlines()[:60]
    bad = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}
    import json
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[3:] + [json.dumps(twice)])
                    + "\n")
    common = ["--config", CONFIG, f"target.path={tiny_assets['target_llama']}",
              f"data.path={data}", f"run.dir={tmp_path / 'run'}", "data.holdout=0",
              "train.val_every_steps=0"]
    refused = colocate("prepare-vocab", *common, cwd=tmp_path)
    assert refused.returncode == 2
    assert (f"{data}:4: role order: messages[0]: the conversation starts with an assistant "
            "turn (roles: assistant, user)") in refused.stderr, refused.stderr[-3000:]
    assert "set data.skip_invalid=true" in refused.stderr and "Traceback" not in refused.stderr

    skipped = colocate("prepare-vocab", *common, "data.skip_invalid=true", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "62 lines -> 60 conversations (0 held out; skipped: 2 invalid" in skipped.stdout
    assert f"{data}:4: role order" in skipped.stderr
    assert f"{data}:62: role order: messages[1]: a second user turn in a row" in skipped.stderr
