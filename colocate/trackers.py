"""Where the per-step metrics rows go: `metrics.report_to` (jsonl, tensorboard, wandb).

Only the first trainer opens trackers (`open_trackers`); `metrics.MetricsLog` computes the
rows and hands each flush to `Trackers.write`. Every tracker gets the same rows:

* jsonl        RUN_DIR/metrics.jsonl, always on: resume cuts it back to the checkpoint's
               step, and the model card, served evals and examples/tiny/run.sh read it.
* tensorboard  RUN_DIR/tb (`pip install 'colocate[tensorboard]'`); a resumed run hides the
               events an earlier run wrote past the checkpoint (purge_step).
* wandb        one W&B run per run directory (`pip install 'colocate[wandb]'`), its files
               under RUN_DIR/wandb; the resolved config is logged once, when it opens, and a
               resumed run continues the same W&B run id. `metrics.wandb_mode=offline` (or
               WANDB_MODE=offline) needs no network: `wandb sync RUN_DIR/wandb/offline-run-*`
               uploads it later.

Optional packages are imported only when asked for; that they are installed was checked
with the config (`Config.check_training`), before any process started its work.
"""

from __future__ import annotations

import json
import os

from colocate.config import Config, ConfigError

JSONL_NAME = "metrics.jsonl"
WANDB_ID_NAME = "wandb_run_id"


def truncate_metrics(path: str, after_step: int) -> int:
    """Keep the rows of metrics.jsonl up to `after_step` (a resumed run writes the later
    steps again) and drop a torn last line; returns how many rows went. Atomic."""
    if not os.path.exists(path):
        return 0
    from colocate.data.cache import atomic_write

    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a crash mid-write; the step is written again
                dropped += 1
                continue
            if row.get("step", 0) <= after_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic_write(path, lambda f: f.writelines(keep), binary=False)
    return dropped


def _scalars(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlTracker:
    def __init__(self, path: str, *, resumed_at: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Rows past the checkpoint were written by the run that died after it: this run
        # writes those steps again.
        truncate_metrics(path, resumed_at)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: str, *, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events from that step on, left by an earlier run, are hidden.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=resumed_at + 1 if resumed_at
                                    else None)

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            for key, value in _scalars(row).items():
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: Config, *, resumed_at: int = 0):
        import wandb

        run_dir, m = cfg.run.dir, cfg.metrics
        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, WANDB_ID_NAME)
        # A resumed run goes on in the W&B run it started; a fresh one (no checkpoint, or
        # checkpoint.resume=never) starts a new W&B run.
        run_id = None
        if resumed_at and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        self.run = wandb.init(
            project=m.wandb_project, name=m.wandb_run_name or os.path.basename(
                os.path.abspath(run_dir)), id=run_id, resume="allow" if run_id else None,
            dir=run_dir, mode=m.wandb_mode or None, config=cfg.to_dict())
        with open(id_path, "w") as f:
            f.write(self.run.id + "\n")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log(_scalars(row), step=row["step"])

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service process has written the run's files;
        # teardown waits for it, so they are complete when the trainer exits.
        wandb.teardown()


class Trackers:
    """The run's trackers; `write` and `close` go to each of them in `report_to` order."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def write(self, rows: list[dict]) -> None:
        if rows:
            for tracker in self.trackers:
                tracker.write(rows)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(cfg: Config, *, resumed_at: int = 0) -> Trackers:
    """The trackers `metrics.report_to` names (the first trainer only)."""
    trackers = []
    for name in cfg.metrics.report_to:
        if name == "jsonl":
            trackers.append(JsonlTracker(os.path.join(cfg.run.dir, JSONL_NAME),
                                         resumed_at=resumed_at))
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(os.path.join(cfg.run.dir, "tb"),
                                               resumed_at=resumed_at))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg, resumed_at=resumed_at))
        else:  # MetricsSection validated the names
            raise ConfigError(f"metrics.report_to: unknown tracker {name!r}")
    return Trackers(trackers)
