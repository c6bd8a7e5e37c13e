import os
import sys

from colocate.cli import main


def _leave_without_finalizing(code: int) -> None:
    """End a torchrun worker without Python's interpreter teardown.

    gloo's worker thread may still be releasing the last collective's work (tensors that
    Python owns) when the main thread returns; if the interpreter is finalizing by then,
    taking the GIL ends that thread mid-destructor and the process aborts ("terminate called
    without an active exception", exit -6; seen in CI about one run in three under load).
    Everything teardown is for still runs here: non-daemon threads are joined, atexit
    handlers (the MPS owner stops its daemon there) and logging are flushed."""
    import atexit
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # a signal handler's or argparse's exit
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _leave_without_finalizing(code)
    raise SystemExit(code)
