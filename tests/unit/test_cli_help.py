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
    assert "colocate/config/" in out and "torch" not in modules
    out, _ = colocate_importing("eval", "--help")
    assert "config keys: target, data (holdout, chat_template), eval" in out


def test_a_torchrun_worker_exits_with_its_status_after_the_exit_handlers():
    """Under torchrun (TORCHELASTIC_RUN_ID set) colocate skips interpreter teardown (gloo can
    abort there): argparse's statuses still come through, atexit handlers still run, and an
    idle thread pool left open does not hang the exit."""
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(*args):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    version = run("-m", "colocate", "--version")
    assert version.returncode == 0 and version.stdout.startswith("colocate ")
    assert run("-m", "colocate", "no-such-command").returncode == 2
    script = ("import atexit, concurrent.futures\n"
              "pool = concurrent.futures.ThreadPoolExecutor(1)\n"
              "pool.submit(print, 'pool ran', flush=True).result()\n"
              "atexit.register(print, 'atexit ran')\n"
              "from colocate.__main__ import _leave_without_finalizing\n"
              "_leave_without_finalizing(7)\n")
    ended = run("-c", script)
    assert ended.returncode == 7 and ended.stdout.split() == ["pool", "ran", "atexit", "ran"]
