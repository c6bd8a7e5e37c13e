"""The README's first command, end to end: generate -> train -> eval on the tiny target.

The command is read from the README itself, so a README that names another demo fails here.
Its work is shortened with overrides the script forwards (60 prompts, 10 steps, 32 new
tokens); everything else (the build, torchrun with 4 ranks, the hf reference decoder) is
what a user runs, from a directory of their own: relative paths resolve from there.
"""

import json
import os
import re
import subprocess

from tests.conftest import REPO_ROOT


def readme_demo_command() -> str:
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        first_block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    first_line = first_block.splitlines()[0]
    return first_line.split("&&")[-1].strip()  # after the pip installs


def test_readme_first_command_runs_generate_train_eval(tiny_assets, tmp_path):
    command = readme_demo_command()
    assert command == "bash examples/tiny/run.sh"
    small = tmp_path / "prompts.jsonl"
    with open(tiny_assets["data"]) as f:
        small.write_text("".join(f.readlines()[:60]))
    run_dir = tmp_path / "run"
    # Relative paths, run outside the repository (the script names itself by its path).
    overrides = ["data.path=prompts.jsonl", "data.holdout=8", "train.max_steps=10",
                 "train.val_every_steps=5", "generate.max_new_tokens=32",
                 "eval.max_new_tokens=32", "run.dir=run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(REPO_ROOT, command.split()[1])
    proc = subprocess.run(["bash", script] + overrides, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # 1. generate: every record answered by the target, with its token ids.
    generated = [json.loads(line) for line in open(run_dir / "generated.jsonl")]
    assert len(generated) == 60
    # Both input forms come back as they came: OpenAI messages and ShareGPT conversations.
    replies = [t for r in generated for t in r.get("messages", r.get("conversations", []))
               if t.get("role", t.get("from")) in ("assistant", "gpt")]
    assert len(replies) >= 60 and all(t.get("token_ids") for t in replies)
    # 2. train: on the generated file, 8 conversations held out and validated on.
    config = (run_dir / "config.yaml").read_text()
    assert "path: run/generated.jsonl" in config
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 11))
    val = [r for r in rows if "val_sim_accept_length" in r]
    assert [r["step"] for r in val] == [5, 10]
    # 3. eval: the export served on the 8 held-out prompts; the printed line quotes it.
    served = json.loads((run_dir / "eval.json").read_text())
    assert served["num_prompts"] == 8 and served["steps"] == 4
    assert 1.0 <= served["accept_length"] <= 5.0
    want = (f"accept length on 8 held-out prompts, 4 draft tokens: served "
            f"{served['accept_length']:.2f} (hf) | simulated in training "
            f"{val[-1]['val_sim_accept_length']:.2f} (step 10)")
    assert want in proc.stdout, proc.stdout[-2000:]
