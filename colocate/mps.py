"""CUDA MPS for one job: the plan and each rank's client limits. The node's control daemon
and its client probe are `mps_daemon.py`'s.

Order of calls (the topology module orchestrates; nothing here talks to other ranks):

    plan = plan_from_config(cfg.mps, token)         # every rank, pure; same token node-wide
    # node-local rank 0, before ANY process of the node touches CUDA:
    handle = mps_daemon.start_daemon(plan, timeout_s)  # None: no MPS (off, auto fallback)
    status = node_status(plan, handle)              # small, picklable: share it on the node
    # every rank of the node (rank 0 too), before its first CUDA call:
    activate(status, role, device=local_rank // 2)  # sets os.environ for this process
    ...  train  ...
    # every rank finishes CUDA work, node barrier, then node-local rank 0:
    mps_daemon.stop_daemon(handle, timeout_s)       # no-op unless this process owns it

Why a job-private pipe directory: a daemon at the default /tmp/nvidia-mps may belong to
someone else, and stopping it at the end of our job would break them. Every CUDA process of
the job (helpers and subprocesses included) inherits ``CUDA_MPS_PIPE_DIRECTORY`` from
``activate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from colocate.config import MpsSection

if TYPE_CHECKING:
    from colocate.mps_daemon import DaemonHandle

log = logging.getLogger(__name__)

ROLES = ("trainer", "engine")
CONTROL_BIN = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
SM_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
PINNED_ENV = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
PRIORITY_ENV = "CUDA_MPS_CLIENT_PRIORITY"  # 0 normal, 1 below normal
# A role's own limits: never inherited by the daemon (they would become server-wide) or by a
# process that is no client of ours.
ROLE_LIMIT_ENVS = (SM_ENV, PINNED_ENV, PRIORITY_ENV)
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # where clients look when CUDA_MPS_PIPE_DIRECTORY is unset


class MpsError(RuntimeError):
    """MPS could not be set up; the message names what failed and the fix."""


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MpsPlan:
    mode: str
    """auto, required or off (from mps.mode)."""
    pipe_dir: str
    """CUDA_MPS_PIPE_DIRECTORY for every CUDA process of the job on this node."""
    log_dir: str
    """CUDA_MPS_LOG_DIRECTORY: control.log and server.log of a daemon we start."""
    private_root: str
    """<tmp>/colocate-mps-<token>: ours to create and remove (pipe_dir may be outside it)."""
    trainer_sm_percent: int = 100
    engine_sm_percent: int = 100
    trainer_mem_fraction: float = 0.0
    engine_mem_fraction: float = 0.0
    pinned_mem_limit: bool = False
    trainer_priority: str = "normal"
    engine_priority: str = "normal"
    gpu_mem_bytes: int | None = None
    """Total memory of one GPU (from the probe); needed for the pinned-memory limit."""

    @property
    def env(self) -> dict[str, str]:
        """The variables every CUDA process of the job must see when MPS is active."""
        return {PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir}


def job_token(env: Mapping[str, str] | None = None) -> str:
    """A name every local rank of this job computes alike, and no other job on the node.

    SLURM job id, torchrun run id and MASTER_PORT when present; the parent pid as a last
    resort (torchrun's agent is the parent of all local ranks). The uid keeps users sharing
    /tmp apart. Long tokens are hashed: the pipe dir must stay short (socket path limit).
    """
    env = os.environ if env is None else env
    parts = [str(os.getuid())]
    parts += [env[k] for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_PORT")
              if env.get(k) and env.get(k) != "none"]
    if len(parts) == 1:
        parts.append(f"p{os.getppid()}")
    token = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))
    if len(token) > 24:
        token = f"{parts[0]}-{hashlib.sha1(token.encode()).hexdigest()[:12]}"
    return token


def check_sm_shares(section: MpsSection) -> list[str]:
    """Warnings about SM percentages that are legal but probably not meant.

    Sums above 100 are fine (MPS oversubscribes: each value is a cap, not a reservation).
    Both at 100 is fine too and the default: MPS is then work-conserving, and limits only
    help isolation, not throughput. A sum below 100 leaves SMs that neither role may use.
    """
    t, e = section.trainer_sm_percent, section.engine_sm_percent
    if section.mode == "off":
        ignored = [k for k, v in (("mps.trainer_sm_percent", t), ("mps.engine_sm_percent", e)) if v != 100]
        ignored += ["mps.pinned_mem_limit"] if section.pinned_mem_limit else []
        ignored += [f"mps.{role}_priority" for role in ROLES
                    if getattr(section, f"{role}_priority") != "normal"]
        return [f"{k} is ignored with mps.mode=off" for k in ignored]
    out = []
    if t + e < 100:
        out.append(f"mps.trainer_sm_percent ({t}) + mps.engine_sm_percent ({e}) = {t + e} < 100: "
                   f"{100 - t - e}% of the SMs stay idle; raise one of them (sums above 100 are "
                   "fine)")
    for key, value in (("mps.trainer_sm_percent", t), ("mps.engine_sm_percent", e)):
        if value < 100:
            # cuBLAS returned wrong bf16 GEMMs under a cap (docs/gpu-logs/online-h200/
            # trainer-sm-cap/); colocate/gemm_check.py stops such a rank at start-up.
            out.append(f"{key} ({value}) < 100: on an H200 the GEMM library computed wrong "
                       "results under MPS SM caps of 60, 70 and 80; each capped rank checks the "
                       "GEMM shapes its role runs against float64 at start-up and stops if one "
                       "is wrong (a pass covers those shapes only). 100 (the default) is safe")
    return out


def plan_from_config(section: MpsSection, token: str, *, tmp_dir: str | None = None) -> MpsPlan:
    """Derive the node's MPS plan from the config section and the job token; pure."""
    for msg in check_sm_shares(section):
        log.warning("mps: %s", msg)
        warnings.warn(msg, stacklevel=2)
    root = os.path.join(tmp_dir or tempfile.gettempdir(), f"colocate-mps-{token}")
    return MpsPlan(
        mode=section.mode,
        pipe_dir=section.pipe_dir or os.path.join(root, "pipe"),
        log_dir=os.path.join(root, "log"),
        private_root=root,
        trainer_sm_percent=section.trainer_sm_percent,
        engine_sm_percent=section.engine_sm_percent,
        trainer_mem_fraction=section.trainer_mem_fraction,
        engine_mem_fraction=section.engine_mem_fraction,
        pinned_mem_limit=section.pinned_mem_limit,
        trainer_priority=section.trainer_priority,
        engine_priority=section.engine_priority,
    )


# --------------------------------------------------------------------------- per-rank setup


@dataclass(frozen=True)
class MpsStatus:
    """What node-local rank 0 tells the node's other ranks; small and picklable."""
    active: bool
    reason: str
    pipe_dir: str
    log_dir: str = ""
    plan: MpsPlan | None = None
    """The plan rank 0 used (limits, GPU memory); None only for hand-made statuses."""


def node_status(plan: MpsPlan, handle: DaemonHandle | None) -> MpsStatus:
    """The outcome of ``start_daemon`` on this node, to broadcast to its ranks."""
    if handle is None:
        reason = ("mps.mode=off" if plan.mode == "off" else
                  "MPS unavailable: GPUs are time-sliced (see node-local rank 0's warning)")
        return MpsStatus(False, reason, "", "", plan)
    plan = dataclasses.replace(plan, gpu_mem_bytes=handle.gpu_mem_bytes)
    how = "started by node-local rank 0" if handle.owned else "reused (already running)"
    return MpsStatus(True, f"MPS daemon {how}", plan.pipe_dir, plan.log_dir, plan)


def role_env(plan: MpsPlan, role: str, device: int = 0) -> dict[str, str]:
    """The MPS limits of ``role`` for a client using CUDA ordinal ``device``.

    Only meaningful with MPS active (``activate`` applies it only then); {} for mode off.
    The pinned-memory limit needs ``plan.gpu_mem_bytes`` (known after the probe); without it
    the limit is skipped with a warning. A memory fraction of 0 sets no limit.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if plan.mode == "off":
        return {}
    sm = plan.trainer_sm_percent if role == "trainer" else plan.engine_sm_percent
    env = {SM_ENV: str(sm)}
    if getattr(plan, f"{role}_priority") == "low":
        env[PRIORITY_ENV] = "1"
    fraction = plan.trainer_mem_fraction if role == "trainer" else plan.engine_mem_fraction
    if plan.pinned_mem_limit and fraction > 0:
        if plan.gpu_mem_bytes:
            env[PINNED_ENV] = f"{device}={int(plan.gpu_mem_bytes * fraction) >> 20}M"
        else:
            log.warning("mps: mps.pinned_mem_limit ignored for %s: GPU memory size unknown", role)
    return env


def _ours(path: str, plan: MpsPlan | None) -> bool:
    path = os.path.abspath(path)
    if plan and (path + os.sep).startswith(os.path.abspath(plan.private_root) + os.sep):
        return True
    return any(part.startswith("colocate-mps-") for part in path.split(os.sep))


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")  # only ask if imported: importing it here costs seconds
    return bool(torch is not None and torch.cuda.is_initialized())


def activate(status: MpsStatus, role: str, device: int = 0) -> dict[str, str]:
    """Point this process (and every child it starts) at the node's MPS daemon, with the
    limits of ``role``; returns the variables set. Call before this process's first CUDA call.

    ``device`` is the CUDA ordinal the process will use (``local_rank // 2`` when all GPUs
    of the node are visible; 0 when each rank sees one GPU); it keys the pinned-memory limit.
    Without MPS it sets nothing and removes inherited MPS variables that point at a
    colocate-private dir (a client aimed at a dead or half-started daemon fails with 805).
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if _cuda_initialized():
        raise RuntimeError("mps.activate() after CUDA was initialised in this process: the MPS "
                           "variables would be ignored; call it before any CUDA use")
    if status.active:
        env = {PIPE_ENV: status.pipe_dir, LOG_ENV: status.log_dir}
        if status.plan is not None:
            env.update(role_env(status.plan, role, device))
        os.environ.update(env)
        return env
    for key in (PIPE_ENV, LOG_ENV):
        if os.environ.get(key) and _ours(os.environ[key], status.plan):
            log.debug("mps: dropping inherited %s=%s (MPS not used)", key, os.environ[key])
            del os.environ[key]
    for key in ROLE_LIMIT_ENVS:
        os.environ.pop(key, None)  # a leftover limit would apply if some daemon serves us
    effective = os.environ.get(PIPE_ENV, DEFAULT_PIPE_DIR)
    if os.path.exists(os.path.join(effective, "control")):
        log.warning("mps: %s (%s), but a daemon serves %s, so this process will still be its "
                    "client; set %s to an empty directory to avoid it", status.reason, role,
                    effective, PIPE_ENV)
    return {}


def apply_trainer_memory_cap(fraction: float, device: int, cuda_api: Any = None) -> bool:
    """Cap this process's caching allocator at ``fraction`` of ``device``'s memory.

    Call after ``activate`` (it initialises CUDA). 0 means no cap (a zero cap would fail
    every allocation). Returns whether a cap was set; False without CUDA. ``cuda_api``
    defaults to ``torch.cuda`` (tests pass a fake).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mps.trainer_mem_fraction: got {fraction}; use a fraction in [0, 1]")
    if cuda_api is None:
        import torch
        cuda_api = torch.cuda
    if fraction == 0.0 or not cuda_api.is_available():
        return False
    cuda_api.set_per_process_memory_fraction(fraction, device)
    return True
