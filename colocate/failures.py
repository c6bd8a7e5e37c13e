"""What a rank leaves behind when it fails: torchrun's error file and the resume command.

torchrun (torch.distributed.elastic) gives every worker a file path in
TORCHELASTIC_ERROR_FILE; a JSON message written there replaces "To enable traceback see ..."
in the launcher's failure summary, and the failure with the smallest timestamp is shown as
the "Root Cause". So the rank whose error is the reason writes it with the current time,
and a rank that failed only because a peer did (or was stopped) writes its note with a
timestamp `FOLLOWER_DELAY_S` later: torchrun's timestamps are whole seconds, and a rank that
wrote nothing (killed by a signal) is stamped when the launcher noticed, so without the
delay a follower could tie with the real cause and win by having the lower rank.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import signal
import sys
import time

FOLLOWER_DELAY_S = 60

log = logging.getLogger(__name__)


def write_error_file(message: str, *, root_cause: bool, traceback_text: str | None = None
                     ) -> bool:
    """Record `message` for torchrun; the first record of a process wins (later errors are
    consequences of the first). Returns whether a file was written (False outside torchrun)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return False
    stamp = int(time.time()) + (0 if root_cause else FOLLOWER_DELAY_S)
    # torchrun shows extraInfo.py_callstack when present, else the message.
    extra: dict = {"timestamp": str(stamp)}
    if traceback_text:
        extra["py_callstack"] = traceback_text
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": extra}}, f)
    except OSError:
        return False
    return True


def resume_hint() -> str:
    """How to resume this run, as the user would do it: under torchrun the command line that
    started it (`torchrun ... -m colocate <args>`, this job's geometry); under
    launch/slurm.sbatch (which says how in COLOCATE_RESUME_WITH) nothing when the job
    requeues itself, else submitting it again."""
    args = shlex.join(sys.argv[1:])
    submit = os.environ.get("COLOCATE_RESUME_WITH")
    if submit == "requeue":
        return "the SLURM job requeues itself and resumes (launch/slurm.sbatch, REQUEUE=1)"
    if submit and sys.argv[1:2] == ["train"]:  # the template runs `colocate train <its args>`
        return (f"resume by submitting the job again with the same sbatch options: "
                f"{submit} {shlex.join(sys.argv[2:])}")
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return f"resume with the same command: python -m colocate {args}"
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ["LOCAL_WORLD_SIZE"])
    where = "--standalone" if nodes == 1 else f"--nnodes {nodes} (same rendezvous)"
    return (f"resume with the same command: torchrun {where} --nproc-per-node "
            f"{os.environ['LOCAL_WORLD_SIZE']} -m colocate {args}")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_when_launcher_dies() -> bool:
    """Have the kernel send this process SIGTERM when its parent (torchrun's agent, or
    slurmstepd) dies. A SIGKILLed agent cannot forward a stop, and its workers would train
    on, holding their GPUs, with nobody left to stop them; with this they stop as on any
    SIGTERM (a checkpoint at the step boundary, train/signals.py). The signal follows the
    parent *thread* that started us: torchrun starts its workers from its main thread.
    Call it first: a parent that dies before the request leaves no signal to send, which
    is checked but only against the parent seen at the call. Linux only; returns whether
    it is set."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as e:
        log.debug("no parent-death signal: %s", e)
        return False
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True
