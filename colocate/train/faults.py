"""Fault injection for the fault tests (tests/integration/test_faults.py): environment knobs
read by the training loop, inert when unset. They exist so a test can cause, in a real run,
what real runs suffer rarely: a NaN gradient, slow checkpoint storage.

    COLOCATE_FAULT_NAN_GRAD_STEPS="3,5"   NaN in the first trainer's gradients at optimizer
                                          steps 3 and 5 (1-based, as metrics.jsonl's step)
    COLOCATE_FAULT_SLOW_CHECKPOINT="5:15" the checkpoint of step 5 takes 15 s longer
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

NAN_GRAD_STEPS = "COLOCATE_FAULT_NAN_GRAD_STEPS"
SLOW_CHECKPOINT = "COLOCATE_FAULT_SLOW_CHECKPOINT"


def nan_grad_steps() -> set[int]:
    text = os.environ.get(NAN_GRAD_STEPS, "")
    return {int(s) for s in text.split(",") if s.strip()}


def slow_checkpoint(step: int) -> None:
    """Sleep if the checkpoint of `step` was asked to be slow."""
    text = os.environ.get(SLOW_CHECKPOINT, "")
    if text:
        at, seconds = text.split(":")
        if int(at) == step:
            log.warning("fault injection: the checkpoint of step %d takes %s s longer", step,
                        seconds)
            time.sleep(float(seconds))
