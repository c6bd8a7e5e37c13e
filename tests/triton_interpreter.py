"""Run a Triton kernel check under Triton's CPU interpreter.

Runs where the `triton` package is importable (CUDA builds of torch bring it; the CPU CI
does not, and skips). TRITON_INTERPRET must be set before Triton is imported, so the check
runs in a child process; it prints the worst error it saw on its last line.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs the triton package")


def worst_error_under_interpreter(check: str) -> float:
    """Run `check` (Python source) with TRITON_INTERPRET=1; the float it printed last."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.strip().splitlines()[-1])
