"""Run one engine/trainer pair as two spawned processes, without torchrun.

Used by `doctor` (CUDA IPC between two processes), the transport benchmark and the tests of
failure handling, which need to kill or freeze one side and watch the other. The parent
hands each child its peer's pid (the channel authenticates with it) and collects results.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from colocate.transport import PairChannel, open_pair_channel


@dataclass
class PairContext:
    engine: bool
    channel: PairChannel
    device: torch.device
    timeout_s: float


@dataclass
class ChildResult:
    role: str
    value: Any = None
    error: str | None = None     # "ExceptionType: message" when the function raised
    exitcode: int | None = None  # negative: killed by that signal
    seconds: float = 0.0         # from the child's start of work to its end

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0


def _child(fn, kwargs, engine: bool, token: str, device: str, timeout_s: float, pid_conn,
           result_conn, env: dict[str, str]) -> None:
    os.environ.update(env)
    role = "engine" if engine else "trainer"
    peer_pid = pid_conn.recv()
    t0 = time.monotonic()
    try:
        channel = open_pair_channel(engine=engine, me=f"{role} rank {int(engine)}",
                                    peer_rank=int(not engine), peer_pid=peer_pid, job_token=token,
                                    pair_index=0, timeout_s=timeout_s)
        torch_device = torch.device(device)
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Two processes sharing the cores: without a fair split their spinning OpenMP
            # threads fight and CPU copies slow down by an order of magnitude.
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        value = fn(PairContext(engine, channel, torch_device, timeout_s), **kwargs)
        result_conn.send(ChildResult(role, value=value, seconds=time.monotonic() - t0))
    except BaseException as e:  # report every failure to the parent, then exit non-zero
        text = f"{type(e).__name__}: {e}"
        result_conn.send(ChildResult(role, error=text, seconds=time.monotonic() - t0))
        traceback.print_exc()
        raise SystemExit(1)


def _try_recv(conn) -> ChildResult | None:
    """A result if one is waiting; None if not (or the child died before sending one)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def run_local_pair(fn: Callable[..., Any], *, kwargs: dict[str, Any] | None = None,
                   device: str = "cpu", timeout_s: float = 30.0, wall_s: float = 120.0,
                   grace_s: float = 15.0, env: dict[str, str] | None = None
                   ) -> tuple[ChildResult, ChildResult]:
    """Run `fn(PairContext, **kwargs)` in an engine and a trainer process.

    `timeout_s` bounds the ring's waits inside the children; `wall_s` bounds the whole run;
    once one child has ended the other gets `grace_s` to end too, then is killed (so a frozen
    or hung child never hangs the caller). Returns (engine, trainer) results.
    """
    ctx = mp.get_context("spawn")
    token = secrets.token_hex(6)
    procs, pid_pipes, result_pipes = [], [], []
    for engine in (True, False):
        pid_recv, pid_send = ctx.Pipe(duplex=False)
        res_recv, res_send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, kwargs or {}, engine, token, device, timeout_s,
                                             pid_recv, res_send, env or {}), daemon=True)
        p.start()
        pid_recv.close()  # the child's ends: only the child may hold them now
        res_send.close()
        procs.append(p)
        pid_pipes.append(pid_send)
        result_pipes.append(res_recv)
    pid_pipes[0].send(procs[1].pid)
    pid_pipes[1].send(procs[0].pid)

    deadline = time.monotonic() + wall_s
    results: list[ChildResult | None] = [None, None]
    first_end: float | None = None
    while any(p.exitcode is None for p in procs):
        now = time.monotonic()
        for i, p in enumerate(procs):
            if results[i] is None:
                results[i] = _try_recv(result_pipes[i])
        if first_end is None and any(p.exitcode is not None for p in procs):
            first_end = now
        if now > deadline or (first_end is not None and now - first_end > grace_s):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
            break
        time.sleep(0.02)
    out = []
    for i, (p, role) in enumerate(zip(procs, ("engine", "trainer"))):
        p.join(10)
        if results[i] is None:
            results[i] = _try_recv(result_pipes[i])
        r = results[i] or ChildResult(role, error=f"{role} process ended without a result")
        r.exitcode = p.exitcode
        out.append(r)
    return out[0], out[1]
