"""`colocate check`: the launcher's pre-flight, before torchrun spawns any worker.

    python -m colocate check --config run.yaml --nproc 2G --gpus G [key=value ...]

In about a second (no torch, no model, no data read): the config and the overrides as
`colocate train` reads them, the paths it will open (target.path, data.path,
checkpoint.resume, draft.init_from's files and architecture) and the launch geometry
(an even --nproc of at least 2; 2 ranks per visible GPU on GPUs). launch/train.sh and examples/tiny/run.sh call it first, so a typo costs a second,
not a torchrun start-up of every rank. Errors are the ones `colocate train` raises, one line
each, exit status 2; on success it prints one line and exits 0.

What needs torch or the data (draft.init_from's shape and vocabulary maps, the step count
of train.epochs) `colocate train` checks at start-up, before the first step.
"""

from __future__ import annotations

import argparse
import os

from colocate.config import ConfigError, describe_path, int_arg, load_config
from colocate.geometry import gpu_count_problem, nproc_problem, sp_size_problem


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (as for colocate train)")
    p.add_argument("--nproc", type=int_arg, default=None,
                   help="ranks per node the launcher will start (torchrun --nproc-per-node)")
    p.add_argument("--gpus", type=int_arg, default=None, help="GPUs visible on this node")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, as for colocate train")


def check_launch(nproc: int | None, gpus: int | None, device: str, sp_size: int = 1) -> None:
    """The rules topology.py enforces at start-up (colocate/geometry.py), from the
    launcher's numbers."""
    if nproc is None:
        return
    problem = nproc_problem(nproc) or sp_size_problem(nproc, sp_size)
    if problem:
        raise ConfigError(problem)
    if gpus is None:
        return
    if device == "cuda" and gpus == 0:
        raise ConfigError("run.device: cuda, but no GPU is visible; use run.device=cpu")
    problem = gpu_count_problem(nproc, gpus) if device != "cpu" and gpus else None
    if problem:
        raise ConfigError(problem)


def _need_file(path: str, key: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} {describe_path(path)}: no such file; {what}")


def check_paths(cfg) -> None:
    """The files `colocate train` opens first, named by the key that points at them."""
    _need_file(os.path.join(cfg.target.path, "config.json"), "target.path",
               "point target.path at a local model directory (for the demo: python "
               "examples/tiny/build.py)")
    _need_file(cfg.data.path, "data.path", "point it at a JSONL of conversations")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never"):
        _need_file(os.path.join(resume, "meta.json"), "checkpoint.resume",
                   "use auto, never or a complete step_* directory")
    if cfg.draft.init_from:  # its files and architecture; its shape needs the recipe (torch)
        from colocate.train.warm_start import read_init_config

        read_init_config(cfg)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.check_training()
    check_launch(args.nproc, args.gpus, cfg.run.device, cfg.train.sp_size)
    check_paths(cfg)
    steps = (f"{cfg.train.max_steps} steps" if cfg.train.max_steps
             else f"{cfg.train.epochs} epoch(s)")
    print(f"colocate check: ok ({cfg.draft.method}, {steps}, run.dir {cfg.run.dir}"
          f"{f', {args.nproc} ranks' if args.nproc else ''})", flush=True)
    return 0
