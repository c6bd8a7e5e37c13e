"""Thin entry point: `python -m colocate <command>` (under torchrun for multi-rank commands).

User mistakes end with one readable line (from one rank when every rank would say the same),
not a traceback per rank; set COLOCATE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from colocate import __version__

# Errors that describe a user mistake or a peer's failure: printed as one line.
_READABLE = ("ConfigError", "TopologyError", "DataError", "MpsError", "PeerError", "PeerDied",
             "PeerTimeout", "PeerReportedError", "LayoutMismatch", "SlotOverflow", "ExportError",
             "PatchError", "EvalError", "GenerateError", "FileNotFoundError",
             "ValueError")  # ours name the key and the fix (STYLE.md); others keep the hint


# Raised identically on every rank before roles diverge (bad config, missing files).
_SAME_ON_EVERY_RANK = ("ConfigError", "TopologyError", "FileNotFoundError")


def _commands() -> dict[str, tuple[str, str]]:
    """name -> (module, help). Modules are imported only when their command runs."""
    return {
        "train": ("colocate.train.command", "train a draft with the target on the same GPUs"),
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


# The config sections each command reads (every key is documented in colocate/config.py).
_CONFIG_KEYS = {
    "train": "run, target, engine, data, draft, train, checkpoint, mps, transport and "
             "eval.every_steps / eval.at_end",
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
                  "overrides (every key is documented in colocate/config.py)") if keys else None
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
    except Exception as e:  # noqa: BLE001 - turned into one readable line below
        if os.environ.get("COLOCATE_DEBUG") or type(e).__name__ not in _READABLE:
            raise
        rank = os.environ.get("RANK")
        if type(e).__name__ == "PeerReportedError":
            return 2  # the peer failed first and printed the cause itself
        if type(e).__name__ in _SAME_ON_EVERY_RANK and rank not in (None, "0"):
            return 2  # every rank hit the same input error; rank 0 says it once
        where = f"[rank {rank}] " if rank is not None else ""
        hint = " (COLOCATE_DEBUG=1 shows the traceback)" if type(e) is ValueError else ""
        print(f"colocate {args.command}: error: {where}{e}{hint}", file=sys.stderr, flush=True)
        return 2
