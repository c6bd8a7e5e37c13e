"""Stopping a training run on request: SIGTERM (preemption, `scancel`, torchrun stopping its
workers) and SIGINT (Ctrl-C).

The first signal only sets a flag. Trainers agree on it at every optimizer-step boundary
(`StopRequest.agreed`, a one-integer all-reduce over the trainers' gloo group: every trainer
sees the same answer at the same step, whichever of them got the signal), then checkpoint,
tell their engines to stop and exit with `exit_codes.INTERRUPTED`; rerunning the same
command resumes. Engines never decide: they keep producing until their trainer says stop.

A second signal exits at once (KeyboardInterrupt). "Second" means more than
`REPEAT_GRACE_S` after the first, because one Ctrl-C reaches a worker twice: from the
terminal (same process group) and again from torchrun, which forwards the signal it got.

The step reached and where the run stands are kept here too (`RunState`), so that whatever
ends the run, the first trainer can print one summary line saying how to resume.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from colocate.failures import resume_hint

log = logging.getLogger(__name__)

REPEAT_GRACE_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The process-wide stop flag, set by the first SIGTERM / SIGINT."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only: Python delivers signals there)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            log.debug("%s: stop requested; finishing the current step", self.signal_name)
        elif now - self._first_at > REPEAT_GRACE_S:
            # Default actions from here on, so a third signal cannot interrupt the unwinding.
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")

    def agreed(self, group: dist.ProcessGroup) -> bool:
        """Whether any trainer of `group` (a gloo group) was asked to stop. Collective: every
        trainer calls it at the same step boundary."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a stop signal on another trainer"
        return bool(flag.item())


STOP = StopRequest()


@dataclass
class RunState:
    """What the first trainer knows about the run, for the line printed when it ends early."""

    run_dir: str = ""
    last_step: int = 0        # the step the run was meant to reach
    step: int | None = None   # optimizer steps completed (None: training had not started)
    reports: bool = False     # this rank prints the summary (the first trainer)

    def summary_line(self, how: str) -> str | None:
        """One line: `how` it ended, the step reached, the last checkpoint, how to resume."""
        if self.step is None or not self.reports:
            return None
        from colocate.train.checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir)
        last = found[-1] if found else None
        where = (f"last checkpoint {last}" if last else
                 "no checkpoint yet: a rerun starts from step 0")
        return (f"colocate train: {how} at step {self.step}/{self.last_step}; {where}; "
                f"{resume_hint()}")


RUN = RunState()

