"""Exit statuses of `python -m colocate ...`, one per kind of ending, so scripts and schedulers
can tell "fix your input" from "retry" from "resume" (README: Exit statuses).

    0   OK           the command finished
    1   INTERNAL     a bug or an unexpected library error: the traceback is printed
    2   BAD_INPUT    config, paths, data or launch geometry: the one-line error names the
                     key and the fix; rerunning unchanged fails the same way
    3   PEER_FAILED  another rank failed first; its error (torchrun's "Root Cause") is the
                     reason, this rank only saw it vanish or report
    4   DIVERGED     the loss or gradients stayed non-finite (or the gradient exactly 0)
                     for train.max_nonfinite_steps optimizer steps in a row
    75  INTERRUPTED  stopped by SIGTERM / SIGINT (preemption, Ctrl-C); training checkpoints
                     at the next step boundary first, and rerunning the same command resumes
                     (75 is sysexits' EX_TEMPFAIL: "try again later", what requeue logic expects)

Under torchrun the launcher itself always exits 1 when a worker fails; the worker's status
is the `exitcode` of its entry in torchrun's failure summary.
"""

from __future__ import annotations

OK = 0
INTERNAL = 1
BAD_INPUT = 2
PEER_FAILED = 3
DIVERGED = 4
INTERRUPTED = 75


class Interrupted(Exception):
    """The run stopped on request (a signal), at a clean point: not a failure of this rank."""


class Diverged(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


# Raised because of what the user gave us (names, not classes: most live in modules the
# entry point must not import up front).
_BAD_INPUT = ("ConfigError", "TopologyError", "DataError", "MpsError", "LayoutMismatch",
              "SlotOverflow", "ExportError", "PatchError", "EvalError", "GenerateError",
              "FileNotFoundError", "ValueError")
# Seen because another rank failed: the pair channel's errors and the collectives' (gloo /
# NCCL report a vanished rank as a DistBackendError / DistNetworkError).
_PEER = ("PeerError", "PeerDied", "PeerTimeout", "PeerReportedError", "DistBackendError",
         "DistNetworkError", "DistStoreError")


def _names(e: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(e).__mro__}


def exit_code_for(e: BaseException) -> int:
    """The status a command ending with `e` exits with."""
    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        return INTERRUPTED
    if isinstance(e, Diverged):
        return DIVERGED
    names = _names(e)
    if names & set(_PEER):
        return PEER_FAILED
    if type(e).__name__ in _BAD_INPUT or names & {"ConfigError", "DataError", "TopologyError"}:
        return BAD_INPUT
    return INTERNAL


def is_quiet(e: BaseException) -> bool:
    """This rank has nothing to add: the peer failed first and says why itself."""
    return type(e).__name__ in ("PeerReportedError", "DistBackendError", "DistNetworkError",
                                "DistStoreError")
