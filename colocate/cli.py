"""Thin entry point: `python -m colocate <command>` (under torchrun for multi-rank commands).

User mistakes end with one readable line (from one rank when every rank would say the same),
not a traceback per rank; set COLOCATE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from colocate import __version__

# How long a rank that fails exactly like rank 0 waits before exiting (see _fail).
FOLLOWER_LINGER_S = 3
# Raised identically on every rank before roles diverge (bad config, missing files), or on
# every trainer at the same step (divergence): said once, by rank 0.
_SAME_ON_EVERY_RANK = ("ConfigError", "TopologyError", "FileNotFoundError", "Diverged",
                       "StartupError")


def _commands() -> dict[str, tuple[str, str]]:
    """name -> (module, help). Modules are imported only when their command runs."""
    return {
        "train": ("colocate.train.command", "train a draft with the target on the same GPUs"),
        "check": ("colocate.preflight", "check a train config, its paths and the launch in a "
                  "second, before torchrun (the launchers run it first)"),
        "export": ("colocate.export", "write a run's draft as an sglang EAGLE3 checkpoint"),
        "generate": ("colocate.generate.command",
                     "regenerate a dataset's assistant turns with the target (resumable)"),
        "eval": ("colocate.eval.command",
                 "serve an exported draft greedily and report its accept length"),
        "prepare-vocab": ("colocate.train.prepare_vocab",
                          "tokenize the data and build the draft vocabulary ahead of training"),
        "selftest": ("colocate.selftest", "ring end to end with a synthetic engine (torchrun)"),
        "doctor": ("colocate.doctor", "check GPUs, MPS, CUDA IPC, NUMA and versions"),
        "bench": ("colocate.bench", "benchmarks: transport, train"),
        "patches": ("colocate.patches", "check or apply the sglang patches"),
    }


# The config sections each command reads (every key is documented in colocate/config/).
_CONFIG_KEYS = {
    "train": "run, target, engine, data, draft, train, checkpoint, mps, transport and "
             "eval.every_steps / eval.at_end",
    "check": "those of train",
    "export": "none (it reads RUN_DIR/config.yaml)",
    "generate": "target, data (chat_template, chat_template_kwargs), generate, run.device",
    "eval": "target, data (holdout, chat_template), eval, run.device",
    "prepare-vocab": "target, data, draft.draft_vocab_size, run.dir",
    "bench": "those of train (bench train), and bench",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="colocate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"colocate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Only the chosen command's module is imported (most pull in torch): `colocate --help`
    # lists the commands without importing any of them.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in _commands().items():
        keys = _CONFIG_KEYS.get(name)
        epilog = (f"config keys: {keys}; set them in --config YAML or as key=value "
                  "overrides (every key is documented in colocate/config/)") if keys else None
        command = sub.add_parser(name, help=help_text, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            module = importlib.import_module(module_name)
            command.description = module.__doc__
            module.add_arguments(command)
    args = parser.parse_args(argv)
    modules = {args.command: module}
    logging.basicConfig(level=logging.DEBUG if os.environ.get("COLOCATE_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(modules[args.command].main(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one readable ending below
        return _fail(args.command, modules[args.command], e)


def _is_peer_vanished(e: BaseException) -> bool:
    """A collective that lost a rank: gloo's words for it (the rank that left says why)."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("Connection closed by peer" in text
                                            or "Connection reset by peer" in text)


def _fail(command: str, module, e: BaseException) -> int:
    """End a failed command: one line (or a traceback for a bug) from the rank that knows
    why, torchrun's error file, the run's summary line where the command has one, and the
    exit status of `exit_codes`. Ranks that only saw another rank fail stay quiet."""
    import traceback

    from colocate import exit_codes as codes
    from colocate.failures import write_error_file

    code = codes.exit_code_for(e)
    if _is_peer_vanished(e):
        code = codes.PEER_FAILED
    rank = os.environ.get("RANK")
    where = f"[rank {rank}] " if rank is not None else ""
    line = f"colocate {command}: error: {where}{e}"
    debug = bool(os.environ.get("COLOCATE_DEBUG"))
    quiet = (code == codes.PEER_FAILED and (codes.is_quiet(e) or _is_peer_vanished(e))
             or type(e).__name__ in _SAME_ON_EVERY_RANK and rank not in (None, "0"))
    summary_of = getattr(module, "failure_summary", None)
    if code == codes.INTERRUPTED:
        how = (f"interrupted ({e})" if isinstance(e, KeyboardInterrupt) and str(e)
               else "interrupted" if isinstance(e, KeyboardInterrupt) else str(e))
        summary = summary_of(how) if summary_of else None
        if summary is None and rank in (None, "0"):
            summary = f"colocate {command}: {how}"
        write_error_file(summary or f"{where}{how}", root_cause=summary is not None)
        if summary:
            print(summary, file=sys.stderr, flush=True)
        return code
    if code == codes.INTERNAL or debug:
        text = traceback.format_exc()
        if not quiet or debug:
            print(text, end="", file=sys.stderr, flush=True)
        write_error_file(line, root_cause=not quiet, traceback_text=text)
    else:
        hint = " (COLOCATE_DEBUG=1 shows the traceback)" if type(e) is ValueError else ""
        if not quiet:
            print(line + hint, file=sys.stderr, flush=True)
        write_error_file(line, root_cause=not quiet)
    how = ("failed because another rank did (torchrun's Root Cause says which)"
           if code == codes.PEER_FAILED and quiet else f"failed ({type(e).__name__})")
    summary = summary_of(how) if summary_of else None
    if summary:
        print(summary, file=sys.stderr, flush=True)
    if quiet and code != codes.PEER_FAILED:
        # Rank 0 is failing with this same error right now. torchrun stops every worker
        # once the first one exits, so a follower leaving first would get rank 0 killed
        # (exit -15) before it returns its own status; linger so rank 0's exit lands first.
        time.sleep(FOLLOWER_LINGER_S)
    return code
