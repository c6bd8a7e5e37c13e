"""Run directories through torchrun (issue 16, item 5): a refused run changes nothing in an
existing run dir, a failed start creates none, and a finished run rerun says "already at
step N" and exits 0."""

import hashlib
import os

from tests.integration.test_train import tiny_overrides, torchrun_train


def snapshot(run_dir):
    """Every file under run_dir -> (mtime_ns, sha256)."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = (os.stat(path).st_mtime_ns,
                                                       hashlib.sha256(f.read()).hexdigest())
    return out


def test_refused_and_finished_reruns_leave_the_run_dir_alone(tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    first = torchrun_train(tiny_overrides(tiny_assets, run_dir, "train.max_steps=2",
                                          "train.lr=1e-3", "checkpoint.every_steps=0"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(run_dir)
    assert {"config.yaml", "metrics.jsonl", "export/config.json"} <= set(before)
    assert "lr: 0.001" in open(os.path.join(run_dir, "config.yaml")).read()
    card = open(os.path.join(run_dir, "export", "README.md")).read()  # the model card
    assert f"| target | `{tiny_assets['target_llama']}` |" in card
    assert f"| data | `{tiny_assets['data']}` (0 conversations held out) |" in card
    assert "| steps | 2 optimizer steps," in card
    assert f"--speculative-draft-model-path {run_dir}/export" in card

    # The same command again: nothing to train, said once, exit 0, nothing rewritten.
    again = torchrun_train(tiny_overrides(tiny_assets, run_dir, "train.max_steps=2",
                                          "train.lr=1e-3"), nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(f"{run_dir}: already at step 2 (train.max_steps=2); nothing to "
                              f"train, the draft is in {run_dir}/export") == 1, again.stdout
    assert snapshot(run_dir) == before

    # Going on with other data: another draft vocabulary, refused; config.yaml untouched.
    other = tmp_path / "other.jsonl"
    with open(tiny_assets["data"]) as f:
        other.write_text("".join(f.readlines()[:40]))
    refused = torchrun_train(tiny_overrides(tiny_assets, run_dir, "train.max_steps=4",
                                            f"data.path={other}"), nproc=2)
    assert refused.returncode != 0
    assert "was trained with another draft vocabulary" in refused.stderr, refused.stderr[-3000:]
    assert snapshot(run_dir) == before

    # A run that fails at start-up (a missing target) creates no run directory.
    fresh = str(tmp_path / "fresh")
    failed = torchrun_train(tiny_overrides(tiny_assets, fresh, "train.max_steps=2") +
                            [f"data.path={tmp_path / 'bad.jsonl'}"], nproc=2)
    assert failed.returncode != 0 and "bad.jsonl" in failed.stderr, failed.stderr[-3000:]
    assert not os.path.exists(fresh)
