"""`eval.every_steps` and `eval.at_end`: the served accept length of a run's drafts, measured
by `colocate eval` while (or after) the run trains.

Each evaluation is `python -m colocate eval` on an export of the draft, in a subprocess of
the first trainer, so it never stalls the ring (its engine waits are bounded by
run.timeout_s) and holds no sglang state in a training process. The subprocess gets a plain
environment: no torchrun variables (sglang's scheduler would read RANK/WORLD_SIZE as its
own) and no MPS variables (the job's MPS daemon stops when the job's ranks are done; an
evaluation may outlive that). `eval.at_end` runs after the job's ranks have finished, when
the engines' GPU memory is free again; evaluations launched during training are waited
for then too. Each result lands in RUN_DIR/evals.jsonl (one row per evaluation, with the
held-out validation's sim_accept_length of the same step when there is one) and as a line
on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from colocate.config import Config
from colocate.model_card import write_model_card

log = logging.getLogger(__name__)

def plain_env() -> dict[str, str]:
    """os.environ without the launcher's and MPS's variables."""
    from colocate.topology import is_launcher_var

    return {k: v for k, v in os.environ.items()
            if not is_launcher_var(k) and not k.startswith("CUDA_MPS_")}


@dataclass
class _Pending:
    step: int
    out: str
    log_path: str
    proc: subprocess.Popen
    started: float


class ServedEvals:
    """The evaluations of one run (first trainer only)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pending: list[_Pending] = []

    def launch(self, step: int, export_dir: str) -> None:
        """Start `colocate eval` on the export of optimizer step `step` (returns at once)."""
        where = os.path.dirname(os.path.abspath(export_dir))
        out, log_path = os.path.join(where, "eval.json"), os.path.join(where, "eval.log")
        os.makedirs(where, exist_ok=True)
        cmd = [sys.executable, "-m", "colocate", "eval", "--config",
               os.path.join(self.cfg.run.dir, "config.yaml"), "--draft", export_dir, "--out", out]
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=plain_env())
        self.pending.append(_Pending(step, out, log_path, proc, time.monotonic()))
        log.info("served eval of step %d started (log: %s)", step, log_path)

    def poll(self) -> None:
        """Report the evaluations that finished, without waiting."""
        for item in [p for p in self.pending if p.proc.poll() is not None]:
            self._report(item)

    def finish(self) -> None:
        """Wait for every evaluation (each bounded by eval.timeout_s) and report it."""
        for item in list(self.pending):
            left = self.cfg.eval.timeout_s - (time.monotonic() - item.started)
            try:
                item.proc.wait(timeout=max(left, 0.0))
            except subprocess.TimeoutExpired:
                item.proc.kill()
                item.proc.wait()
                log.error("served eval of step %d ran past eval.timeout_s=%.0f s and was "
                          "stopped; see %s", item.step, self.cfg.eval.timeout_s, item.log_path)
            self._report(item)

    def stop(self, why: str) -> None:
        """The run is ending early (a stop signal, a failure): end every evaluation still
        running (SIGTERM, then SIGKILL after 30 s) instead of leaving it on the GPU with
        nobody to read its result, and say how to run it again."""
        for item in list(self.pending):
            if item.proc.poll() is None:
                item.proc.terminate()
                try:
                    item.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    item.proc.kill()
                    item.proc.wait()
                export = os.path.join(os.path.dirname(item.out), "export")
                log.warning("served eval of step %d stopped (%s); run it again with: python -m "
                            "colocate eval --config %s --draft %s --out %s", item.step, why,
                            os.path.join(self.cfg.run.dir, "config.yaml"), export, item.out)
                self.pending.remove(item)
            else:
                self._report(item)

    def _report(self, item: _Pending) -> None:
        self.pending.remove(item)
        if item.proc.returncode != 0 or not os.path.isfile(item.out):
            log.error("served eval of step %d failed (exit %s); see %s", item.step,
                      item.proc.returncode, item.log_path)
            return
        with open(item.out) as f:
            result = json.load(f)
        row = {"step": item.step, "engine": result["engine"],
               "accept_length": result["accept_length"], "num_prompts": result["num_prompts"],
               "steps": result["steps"], "eval_json": item.out,
               "val_sim_accept_length": _val_sim(self.cfg.run.dir, item.step)}
        with open(os.path.join(self.cfg.run.dir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        export = os.path.join(os.path.dirname(item.out), "export")
        if os.path.isfile(os.path.join(export, "config.json")):
            write_model_card(export, export)  # the card now quotes the served accept length
        sim = row["val_sim_accept_length"]
        print(f"served eval after step {item.step} ({row['engine']}, {row['steps']} draft "
              f"steps, {row['num_prompts']} held-out prompts): accept length "
              f"{row['accept_length']:.2f}"
              + (f" | simulated on the held-out split: {sim:.2f}" if sim is not None else ""),
              flush=True)


def _val_sim(run_dir: str, step: int) -> float | None:
    """val_sim_accept_length of `step` in metrics.jsonl, when that step validated."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("step") == step and "val_sim_accept_length" in row:
                return row["val_sim_accept_length"]
    return None
