"""`colocate --help` is fast: it imports no command module (they pull in torch), and each
command's help points to the config keys it reads (issue 16, item 11)."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def colocate_importing(*args):
    """(stdout, modules imported) of `python -X importtime -m colocate ARGS`."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "colocate", *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    return proc.stdout, modules


def test_help_imports_no_command_and_no_torch():
    out, modules = colocate_importing("--help")
    assert "prepare-vocab" in out and "generate" in out
    assert "torch" not in modules and "colocate.train.command" not in modules


def test_command_help_names_its_config_keys_without_torch():
    out, modules = colocate_importing("train", "--help")
    assert "config keys: run, target, engine, data, draft, train, checkpoint" in out
    assert "colocate/config.py" in out and "torch" not in modules
    out, _ = colocate_importing("eval", "--help")
    assert "config keys: target, data (holdout, chat_template), eval" in out
