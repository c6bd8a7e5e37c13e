"""What a training run may do to its run directory, and when.

* A run that is refused (a checkpoint from another vocabulary or pair count, a bad path)
  changes nothing in an existing run directory, and creates none: `config.yaml` is written
  only once the trainer has accepted the run (resume checks passed), not at start-up.
* A run whose latest checkpoint already reached the step it would train to says so and
  exits 0 before any process group or model exists ("already at step N").
"""

from __future__ import annotations

import json
import logging
import os

from colocate.config import Config, save_config
from colocate.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def finished_message(cfg: Config) -> str | None:
    """The line to print when the checkpoint this run would resume from is already at (or
    past) the step it trains to; None when there is work to do."""
    path = ckpt.find_resume(cfg.run.dir, cfg.checkpoint.resume)
    if path is None:
        return None
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    step, t = int(meta["step"]), cfg.train
    last = t.stop_at_step or t.max_steps
    if not last and meta.get("epochs") == t.epochs:
        # train.epochs: the step count is known once the data is packed; the checkpoint
        # holds what the same setting resolved to (the same data, or the resume is refused).
        last = int(meta.get("total_steps", 0))
    if not last or step < last:
        return None
    key = ("train.stop_at_step" if t.stop_at_step else "train.epochs" if t.epochs
           else "train.max_steps")
    setting = f"{key}={t.epochs}, {last} steps" if key == "train.epochs" else f"{key}={last}"
    export = os.path.join(cfg.run.dir, "export")
    if os.path.isfile(os.path.join(export, "config.json")):
        where = f"the draft is in {export}"
    else:
        where = f"export it with: python -m colocate export {cfg.run.dir} {export}"
    return (f"{cfg.run.dir}: already at step {step} ({setting}); nothing to train, "
            f"{where}. To train further raise {key}; to start over use a new run.dir or "
            "checkpoint.resume=never")


def record_config(cfg: Config, num_pairs: int, device_type: str, num_nodes: int = 1) -> None:
    """Write RUN_DIR/config.yaml (the first trainer, once the run is accepted)."""
    os.makedirs(cfg.run.dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    log.info("run %s: %d pair(s) on %d node(s), %s; resolved config in %s/config.yaml",
             cfg.run.dir, num_pairs, num_nodes, device_type, cfg.run.dir)
