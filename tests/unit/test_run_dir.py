"""`finished_message`: a rerun of a finished run says "already at step N" (issue 16, item 5;
tests/integration/test_run_dir.py runs it through torchrun)."""

import json
import os

from colocate.config import load_config
from colocate.train.run_dir import finished_message, record_config


def fake_run(tmp_path, step):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step}))
    return str(run)


def test_finished_run_says_where_it_stands(tmp_path):
    run = fake_run(tmp_path, 20)
    cfg = load_config(None, [f"run.dir={run}", "train.max_steps=20"])
    assert finished_message(cfg) == (
        f"{run}: already at step 20 (train.max_steps=20); nothing to train, export it with: "
        f"python -m colocate export {run} {run}/export. To train further raise "
        "train.max_steps; to start over use a new run.dir or checkpoint.resume=never")
    os.makedirs(f"{run}/export")
    open(f"{run}/export/config.json", "w").close()
    assert f"the draft is in {run}/export" in finished_message(cfg)
    stopped = load_config(None, [f"run.dir={run}", "train.max_steps=40", "train.stop_at_step=20"])
    assert "already at step 20 (train.stop_at_step=20)" in finished_message(stopped)


def test_unfinished_or_fresh_runs_go_on(tmp_path):
    run = fake_run(tmp_path, 20)
    assert finished_message(load_config(None, [f"run.dir={run}", "train.max_steps=30"])) is None
    assert finished_message(load_config(None, [f"run.dir={run}", "train.max_steps=20",
                                               "checkpoint.resume=never"])) is None
    fresh = load_config(None, [f"run.dir={tmp_path}/fresh"])
    assert finished_message(fresh) is None and not os.path.exists(f"{tmp_path}/fresh")
    record_config(fresh, 1, "cpu")
    assert load_config(f"{tmp_path}/fresh/config.yaml") == fresh
