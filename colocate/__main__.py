import os
import sys

from colocate.cli import main


def _leave_without_finalizing(code: int) -> None:
    """End a torchrun worker without Python's interpreter teardown.

    gloo's worker thread may still be releasing the last collective's work (tensors that
    Python owns) when the main thread returns; if the interpreter is finalizing by then,
    taking the GIL ends that thread mid-destructor and the process aborts ("terminate called
    without an active exception", exit -6; seen in CI about one run in three under load).
    What teardown is for still runs: threading's shutdown (it wakes idle thread pools and
    joins non-daemon threads), atexit handlers (the MPS owner stops its daemon there) and
    flushing; whatever happens in them, the process ends here with `code`."""
    import atexit
    import logging
    import threading

    try:
        threading._shutdown()  # what Python's own exit calls first
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
    finally:
        os._exit(code)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse, or a signal handler's exit
        code = _exit_code(e)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _leave_without_finalizing(code)
    raise SystemExit(code)
