"""Checkpoints: DCP over the trainer group only, atomic, keep the last N.

Layout of RUN_DIR/checkpoints/step_000050/ :
    DCP shards of {"model", "optim"} (each trainer writes its own shards)
    vocab.safetensors   d2t / t2d the draft was trained with (export and resume check)
    meta.json           step, every pair's data position, every trainer's RNG state
A checkpoint is written under a temporary name and renamed when complete, so a directory
named step_* is always whole; a crash leaves only a *.tmp directory, ignored and cleaned.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from colocate.config import describe_path

PREFIX = "step_"


@dataclass
class CheckpointMeta:
    step: int                       # optimizer steps completed
    data_states: list[dict | None]  # per pair: the data position after its last micro-step
    rng_states: list[dict]          # per trainer: {"cpu": ..., "cuda": ...} RNG states, base64
    vocab_sha: str
    total_steps: int = 0            # the run's step count when saved (train.epochs resolved)
    epochs: int = 0                 # train.epochs of that run (0: it set train.max_steps)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_root(run_dir), PREFIX + "*"))
             if os.path.basename(p)[len(PREFIX):].isdigit()
             and os.path.isfile(os.path.join(p, "meta.json"))]
    # By step number: as strings step_1000000 would sort before step_999999.
    return sorted(paths, key=lambda p: int(os.path.basename(p)[len(PREFIX):]))


def find_resume(run_dir: str, resume: str) -> str | None:
    """checkpoint.resume: auto -> latest in run_dir (or None), never -> None, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, "meta.json")):
        raise FileNotFoundError(f"checkpoint.resume {describe_path(resume)}: not a complete "
                                "checkpoint (no meta.json); use auto, never or a step_* directory")
    return resume


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _rng_state() -> dict[str, str]:
    """CPU and (when used) current-CUDA-device generator states, base64."""
    state = {"cpu": _encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(_decode(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


def replace_dir(tmp: str, final: str) -> None:
    """Put the complete directory `tmp` at `final`. An existing `final` is renamed aside
    first and removed only after the swap, so a crash never leaves neither of them."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, data_state: dict | None,
                    vocab: dict[str, torch.Tensor], vocab_sha: str, group: dist.ProcessGroup,
                    is_first: bool, keep_last: int, total_steps: int = 0,
                    epochs: int = 0) -> str:
    """Collective over the trainer group (`group` is its gloo twin). total_steps, epochs:
    the run's, recorded so a rerun of a finished train.epochs run knows it is done."""
    final = os.path.join(checkpoint_root(run_dir), f"{PREFIX}{step:06d}")
    tmp = final + ".tmp"
    if is_first:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group=group)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp, process_group=group)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (data_state, _rng_state()), group=group)
    if is_first:
        save_file({k: v.cpu().contiguous() for k, v in vocab.items()},
                  os.path.join(tmp, "vocab.safetensors"))
        meta = CheckpointMeta(step=step, data_states=[g[0] for g in gathered],
                              rng_states=[g[1] for g in gathered], vocab_sha=vocab_sha,
                              total_steps=total_steps, epochs=epochs)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta.to_json(), f)
        replace_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return final


def read_meta(path: str) -> CheckpointMeta:
    with open(os.path.join(path, "meta.json")) as f:
        return CheckpointMeta(**json.load(f))


def read_vocab(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "vocab.safetensors"))


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    group: dist.ProcessGroup, role_rank: int) -> CheckpointMeta:
    """Restore model and optimizer in place; returns the meta (step, data positions)."""
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    meta = read_meta(path)
    if role_rank < len(meta.rng_states):
        _set_rng_state(meta.rng_states[role_rank])
    return meta
