"""metrics.report_to: the config rules, the deprecated train.tensorboard switch, and each
tracker's files read back (TensorBoard events, the W&B offline run log)."""

import importlib.util
import json

import pytest

from colocate.config import ConfigError, load_config
from colocate.trackers import JsonlTracker, open_trackers
from tests.wandb_offline import read_offline_runs

ROWS = [{"step": s, "loss": 10.0 - s, "acc_0": 0.1 * s, "skipped": 0} for s in range(1, 4)]


def test_a_resumed_jsonl_drops_the_rows_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 6)]
    path.write_text("".join(rows) + '{"step": 6, "lo')  # the crash tore step 6's line
    JsonlTracker(str(path), resumed_at=3)
    assert path.read_text() == "".join(rows[:3])
    # A fresh run (no checkpoint) in the same directory starts the file over.
    JsonlTracker(str(path))
    assert path.read_text() == ""


@pytest.mark.parametrize("value, message", [
    ("[jsonl, mlflow]", "metrics.report_to: unknown tracker(s) ['mlflow']; use any of jsonl, "
                        "tensorboard, wandb"),
    ("[wandb]", "metrics.report_to: ['wandb'] lacks jsonl, which resume, the model card and "
                "the demo read; use e.g. [jsonl, wandb]"),
    ("[jsonl, jsonl]", "metrics.report_to: ['jsonl', 'jsonl'] names a tracker twice"),
])
def test_report_to_names_the_key_and_the_fix(value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"metrics.report_to={value}"])
    assert str(e.value) == message


def test_a_missing_package_is_one_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, ["metrics.report_to=[jsonl, wandb]", "train.max_steps=5"])  # eval: fine
    with pytest.raises(ConfigError) as e:
        cfg.check_training()
    assert str(e.value) == ("metrics.report_to: wandb needs the wandb package, which is not "
                            "installed: pip install 'colocate[wandb]' (or drop wandb from "
                            "metrics.report_to)")


def test_the_deprecated_tensorboard_switch_migrates(tmp_path):
    with pytest.warns(FutureWarning, match="train.tensorboard is deprecated: use "
                                           r"metrics.report_to: \[jsonl, tensorboard\]"):
        cfg = load_config(None, ["train.tensorboard=true"])
    assert cfg.metrics.report_to == ["jsonl", "tensorboard"]
    # The resolved config says it the new way only: reloading it warns no more.
    assert cfg.to_dict()["train"]["tensorboard"] is False


def test_tensorboard_events_hold_the_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"run.dir={tmp_path}", "metrics.report_to=[jsonl, tensorboard]"])
    trackers = open_trackers(cfg)
    trackers.write(ROWS)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == ROWS


def test_wandb_offline_run_holds_the_config_and_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={run_dir}", "metrics.report_to=[jsonl, wandb]",
                             "metrics.wandb_mode=offline", "train.lr=0.002"])
    trackers = open_trackers(cfg)
    trackers.write(ROWS)
    trackers.close()
    (run,) = read_offline_runs(str(run_dir))
    assert run["project"] == "colocate" and run["name"] == "run"
    assert run["config"]["train"]["lr"] == 0.002 and run["config"]["run"]["dir"] == str(run_dir)
    assert run["history"] == ROWS
    # A resumed run goes on in the same W&B run; a fresh one starts another.
    assert (run_dir / "wandb_run_id").read_text().strip() == run["id"]
    for resumed_at, same in ((3, True), (0, False)):
        trackers = open_trackers(cfg, resumed_at=resumed_at)
        trackers.close()
        assert (trackers.trackers[1].run.id == run["id"]) is same
