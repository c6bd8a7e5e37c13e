"""The node's CUDA MPS control daemon: start it (after stopping stale ones), probe that it
serves clients, stop it. `mps.py` owns the plan it follows and each rank's client limits.

Why the probe: the control pipe appearing does not mean the daemon serves clients yet. A
client that connects too early fails with CUDA error 805 (MPS_CONNECTION_FAILED) and stays
broken, so the owner runs a throw-away client (``PROBE_SCRIPT``: cuInit, a context on every
visible device, a tiny alloc/free) in a subprocess until it succeeds, before any rank starts.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import psutil

from colocate.mps import CONTROL_BIN, DEFAULT_PIPE_DIR, PIPE_ENV, ROLE_LIMIT_ENVS, MpsError, MpsPlan

log = logging.getLogger(__name__)

CUDA_ERROR_MPS_CONNECTION_FAILED = 805
# Codes a client sees while the daemon or its server is still coming up; anything else
# (no device, no driver) will not improve by waiting, so we stop probing at once.
_RETRYABLE = {CUDA_ERROR_MPS_CONNECTION_FAILED, 806, 807}  # + RPC_FAILURE, SERVER_NOT_READY
# Unix socket paths are limited to 108 bytes (with the NUL) and MPS creates sockets inside
# the pipe dir, the longest name we know being "control_privileged".
_MAX_PIPE_DIR_LEN = 107 - len("/control_privileged")


def _strip(env: Mapping[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in keys}


def _uuid_devices(env: Mapping[str, str]) -> bool:
    """CUDA_VISIBLE_DEVICES names GPUs by UUID only (GPU-...), so it means the same devices
    to a daemon and to its clients."""
    entries = [e.strip() for e in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return bool(entries) and all(e.startswith("GPU-") for e in entries)


def _daemon_env(plan: MpsPlan) -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES by index in the daemon's env remaps devices for every client (a
    # client keeping "5,6" would then name devices that do not exist), so such a daemon sees
    # all GPUs. By UUID it remaps nothing (NVIDIA's MPS docs recommend UUIDs for this), and
    # it is kept: then a daemon serves only its node's GPUs, e.g. two "nodes" of one host,
    # each with its own pipe dir (tests/gpu/run_two_nodes.sh).
    # Role limits in its env would become server-wide defaults; they belong to each client.
    drop = ROLE_LIMIT_ENVS if _uuid_devices(os.environ) else \
        ("CUDA_VISIBLE_DEVICES", *ROLE_LIMIT_ENVS)
    env = _strip(os.environ, *drop)
    return {**env, **plan.env}


def _probe_env(plan: MpsPlan) -> dict[str, str]:
    # The probe sees the devices this rank sees, without any role's limits.
    return {**_strip(os.environ, *ROLE_LIMIT_ENVS), **plan.env}


# --------------------------------------------------------------------------- the probe


PROBE_SCRIPT = r'''
import ctypes, sys

def report(result, call, cuda=None, devices=0, mem=0, name="?"):
    if cuda is not None and result:
        s = ctypes.c_char_p()
        if cuda.cuGetErrorName(result, ctypes.byref(s)) == 0 and s.value:
            name = s.value.decode()
    print(f"colocate-mps-probe result={result} call={call} name={name} devices={devices} mem={mem}")
    sys.exit(0 if result == 0 else 1)

try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    report(-1, "dlopen(libcuda.so.1)", name="NO_DRIVER_LIBRARY")
cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]

def check(call, *args):
    r = getattr(cuda, call)(*args)
    if r != 0:
        report(r, call, cuda)

check("cuInit", 0)
count = ctypes.c_int()
check("cuDeviceGetCount", ctypes.byref(count))
if count.value == 0:
    report(100, "cuDeviceGetCount (no device visible)", cuda)
mem = None
# Every visible device: MPS can fail per device (compute mode, incompatible devices).
for i in range(count.value):
    dev, ctx, ptr, total = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_size_t()
    check("cuDeviceGet", ctypes.byref(dev), i)
    check("cuDeviceTotalMem_v2", ctypes.byref(total), dev)
    mem = total.value if mem is None else min(mem, total.value)
    check("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)  # the MPS connection happens here
    check("cuCtxSetCurrent", ctx)
    check("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(1 << 20))
    check("cuMemFree_v2", ptr)
    check("cuCtxSetCurrent", ctypes.c_void_p())
    check("cuDevicePrimaryCtxRelease_v2", dev)
report(0, "cuMemFree_v2", cuda, count.value, mem)
'''


def default_probe_argv() -> list[str]:
    """The real client probe: PROBE_SCRIPT in a fresh interpreter (libcuda via ctypes)."""
    return [sys.executable, "-c", PROBE_SCRIPT]


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    cu_result: int | None
    """CUresult of the first failing call (0: success); None when the probe printed none."""
    detail: str
    num_devices: int | None = None
    gpu_mem_bytes: int | None = None


def probe_client(env: Mapping[str, str], timeout_s: float,
                 argv: Sequence[str] | None = None) -> ProbeResult:
    """Run one client probe (``argv``, default the ctypes probe) with ``env``; never raises.

    The probe prints ``colocate-mps-probe result=<CUresult> call=<api> name=<error name>
    devices=<n> mem=<bytes>`` and exits 0 on success.
    """
    argv = list(argv or default_probe_argv())
    try:
        proc = subprocess.run(argv, env=dict(env), capture_output=True, text=True,
                              timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        return ProbeResult(False, None, f"probe still running after {timeout_s:.1f}s (killed)")
    except OSError as e:
        return ProbeResult(False, None, f"probe could not start: {e}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("colocate-mps-probe ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        return ProbeResult(False, None, f"probe exited {proc.returncode} without a result: {tail}")
    fields = dict(kv.split("=", 1) for kv in lines[-1].split()[1:] if "=" in kv)
    try:
        result = int(fields.get("result", ""))
    except ValueError:
        return ProbeResult(False, None, f"unparsable probe line: {lines[-1]}")
    detail = f"CUresult {result} ({fields.get('name', '?')}) from {fields.get('call', '?')}"
    if result != 0:
        return ProbeResult(False, result, detail)
    devices, mem = fields.get("devices", ""), fields.get("mem", "")
    return ProbeResult(True, 0, detail, int(devices) if devices.isdigit() else None,
                       int(mem) if mem.isdigit() and int(mem) > 0 else None)


# --------------------------------------------------------------------------- daemon lifecycle


@dataclass
class DaemonHandle:
    """A daemon serving ``plan.pipe_dir``; only an owned one is ever stopped by us."""
    plan: MpsPlan
    owned: bool
    control_bin: str
    pid: int | None = None
    num_devices: int | None = None
    gpu_mem_bytes: int | None = None
    stopped: bool = False


def _log_tail(plan: MpsPlan, num_lines: int = 15) -> str:
    out = []
    for name in ("control.log", "server.log"):
        path = os.path.join(plan.log_dir, name)
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-num_lines:]
        except OSError:
            continue
        out.append(f"--- tail of {path}:\n" + "\n".join(lines))
    return "\n".join(out) or f"(no control.log/server.log in {plan.log_dir})"


def _context(plan: MpsPlan, last: ProbeResult | None = None) -> str:
    probe = f"; last probe: {last.detail}" if last else ""
    return f"(pipe dir {plan.pipe_dir}, log dir {plan.log_dir}{probe})\n{_log_tail(plan)}"


def make_private_dir(path: str) -> None:
    """Create `path` (mode 0700), or accept an existing one only when this user owns it and
    nobody else may enter it. The MPS pipe dir lives under the world-writable tmp dir: a
    directory another user made there first would let them reach the job's daemon."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise MpsError(f"{path} is not private to this user (owner uid {st.st_uid}, mode "
                       f"{st.st_mode & 0o777:o}): another user could reach the job's MPS "
                       "daemon through it. Remove it (it may belong to someone else), or set "
                       "mps.pipe_dir to a directory only you can open")


def _read_pid(pipe_dir: str) -> int | None:
    # The control daemon writes its pid here (documented MPS behaviour).
    try:
        with open(os.path.join(pipe_dir, "nvidia-cuda-mps-control.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # zombies have exited
    except psutil.Error:
        return False


def _launch(handle: DaemonHandle, timeout_s: float, remaining: Callable[[], float]) -> None:
    """Run ``nvidia-cuda-mps-control -d`` and wait for the control pipe it creates."""
    plan, binary = handle.plan, handle.control_bin
    control = os.path.join(plan.pipe_dir, "control")
    try:
        # -d forks the daemon into the background; the command itself returns at once.
        proc = subprocess.run([binary, "-d"], env=_daemon_env(plan), capture_output=True,
                              text=True, timeout=max(remaining(), 0.1))
    except subprocess.TimeoutExpired:
        raise MpsError(f"`{binary} -d` did not return within {timeout_s:.1f}s "
                       f"{_context(plan)}") from None
    if proc.returncode != 0:
        out = (proc.stderr + proc.stdout).strip()[-500:]
        raise MpsError(f"`{binary} -d` exited {proc.returncode}: {out} {_context(plan)}")
    handle.owned = True
    while not os.path.exists(control):
        if remaining() <= 0:
            raise MpsError(f"timed out after {timeout_s:.1f}s waiting for the MPS control "
                           f"pipe {control} {_context(plan)}")
        time.sleep(min(0.05, remaining()))


def _probe_until_ready(plan: MpsPlan, timeout_s: float, remaining: Callable[[], float],
                       probe_argv: Sequence[str] | None) -> ProbeResult:
    """Probe until a client gets a context; 805 and friends mean the daemon is warming up."""
    delay, informative = 0.1, None
    while True:
        last = probe_client(_probe_env(plan), remaining(), probe_argv)
        if last.ok:
            return last
        if last.cu_result is not None:
            informative = last
        elif informative is not None:  # killed at the deadline: the earlier CUresult says more
            last = dataclasses.replace(last, detail=f"{last.detail}; before it: {informative.detail}")
        if last.cu_result is not None and last.cu_result not in _RETRYABLE:
            raise MpsError(f"the MPS client probe failed: {last.detail} {_context(plan, last)}")
        if remaining() <= 0:
            raise MpsError(f"timed out after {timeout_s:.1f}s waiting for an MPS client probe "
                           f"to succeed {_context(plan, last)}")
        time.sleep(min(delay, remaining()))
        delay = min(delay * 2, 1.0)


def _start_or_raise(plan: MpsPlan, timeout_s: float, probe_argv: Sequence[str] | None,
                    control_bin: str) -> DaemonHandle:
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        return max(deadline - time.monotonic(), 0.0)

    control = os.path.join(plan.pipe_dir, "control")
    if len(plan.pipe_dir) > _MAX_PIPE_DIR_LEN:
        raise MpsError(f"MPS pipe dir {plan.pipe_dir!r} is {len(plan.pipe_dir)} characters; MPS "
                       f"sockets inside it exceed the Unix socket path limit. Set mps.pipe_dir to "
                       f"a path of at most {_MAX_PIPE_DIR_LEN} characters, or a shorter TMPDIR")
    binary = shutil.which(control_bin, path=os.environ.get("PATH"))
    # Daemons of this user's jobs that died without stopping them (mps_owner.py).
    from colocate import mps_owner

    mps_owner.stop_stale_daemons(os.path.dirname(plan.private_root),
                                 timeout_s=min(max(remaining() / 4, 1.0), 10.0))

    # A daemon may already serve this dir (launch/mps.sh, a restarted job): use, never own.
    if os.path.exists(control):
        first = probe_client(_probe_env(plan), remaining(), probe_argv)
        if first.ok:
            log.info("mps: reusing the daemon already serving %s (not ours to stop)", plan.pipe_dir)
            return DaemonHandle(plan, False, binary or control_bin, _read_pid(plan.pipe_dir),
                                first.num_devices, first.gpu_mem_bytes)
        log.info("mps: %s exists but a client cannot connect (%s); starting a daemon",
                 control, first.detail)

    if binary is None:
        raise MpsError(f"{control_bin} is not on PATH: MPS is not installed on this node (it "
                       "ships with the NVIDIA driver's compute utilities)")
    fresh_root = not os.path.exists(plan.private_root)
    for path in (plan.pipe_dir, plan.log_dir):
        make_private_dir(path)
    handle = DaemonHandle(plan, False, binary)  # owned once `-d` succeeded
    try:
        _launch(handle, timeout_s, remaining)
        handle.pid = _read_pid(plan.pipe_dir)
        mps_owner.write_record(plan.private_root, daemon_pid=handle.pid, pipe_dir=plan.pipe_dir,
                               control_bin=handle.control_bin)
        last = _probe_until_ready(plan, timeout_s, remaining, probe_argv)
        handle.num_devices, handle.gpu_mem_bytes = last.num_devices, last.gpu_mem_bytes
    except BaseException:
        # The error already holds the log tail; leave no daemon and no dirs of ours behind.
        # A daemon we did not start (`-d` refused: one already runs there) is left alone.
        if handle.owned and not stop_daemon(handle, timeout_s=min(max(timeout_s, 1.0), 10.0)):
            atexit.register(_stop_at_exit, handle)  # one more try when this process ends
        elif fresh_root:
            shutil.rmtree(plan.private_root, ignore_errors=True)
        raise
    atexit.register(_stop_at_exit, handle)  # safety net; stop_daemon is idempotent
    log.info("mps: daemon (pid %s) serves %s; log dir %s", handle.pid, plan.pipe_dir, plan.log_dir)
    return handle


def start_daemon(plan: MpsPlan, timeout_s: float, *, probe_argv: Sequence[str] | None = None,
                 control_bin: str = CONTROL_BIN) -> DaemonHandle | None:
    """Make sure an MPS daemon serves ``plan.pipe_dir`` and a client can connect.

    Call on node-local rank 0 only, before any process of the node initialises CUDA, and
    share ``node_status(plan, handle)`` with the node's other ranks. Reuses a daemon that
    already serves the dir (not owned: ``stop_daemon`` leaves it alone); otherwise starts
    ``nvidia-cuda-mps-control -d`` and waits, bounded by ``timeout_s`` in all, for its
    control pipe and then for a successful client probe (``probe_argv``, default the ctypes
    probe; tests substitute a fake). Returns None when MPS is not used: mode off, or mode
    auto after a failure (a loud warning says why the GPU will be time-sliced). Raises
    ``MpsError`` in mode required.
    """
    if plan.mode == "off":
        return None
    try:
        return _start_or_raise(plan, timeout_s, probe_argv, control_bin)
    except MpsError as e:
        if plan.mode == "required":
            raise MpsError(f"mps.mode=required but MPS is not usable: {e}\nFix: install and enable "
                           "CUDA MPS on this node (nvidia-cuda-mps-control, GPUs in DEFAULT or "
                           "EXCLUSIVE_PROCESS compute mode), or set mps.mode=auto to time-slice "
                           "the GPU instead, or mps.mode=off") from None
        msg = (f"MPS unavailable, so trainer and engine will TIME-SLICE each GPU (no concurrent "
               f"kernels, much slower): {e}\nSet mps.mode=off to silence this, or "
               "mps.mode=required to fail instead.")
        log.warning("mps: %s", msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return None


def _stop_at_exit(handle: DaemonHandle) -> None:
    try:
        stop_daemon(handle, timeout_s=10.0)
    except Exception as e:  # noqa: BLE001 - at interpreter exit a traceback helps no one
        log.warning("mps: stopping the daemon at exit failed: %s", e)


def _wait_gone(handle: DaemonHandle, control: str, until: float) -> bool:
    while True:
        gone = not _alive(handle.pid) if handle.pid else not os.path.exists(control)
        if gone or time.monotonic() >= until:
            return gone
        time.sleep(0.05)


def stop_daemon(handle: DaemonHandle | None, timeout_s: float = 30.0) -> bool:
    """Quit an owned daemon, wait (bounded) for it to exit, remove the private dirs.

    Call on the owner after a node barrier that every local rank enters once its CUDA work
    is done. Idempotent; a no-op for None or a reused daemon. ``quit`` first, SIGTERM to
    the daemon's pid after half of ``timeout_s``. Returns False (and logs a warning naming
    the pid, the pipe dir and the fix) when the daemon outlived ``timeout_s``; the dirs are
    then kept so it can be stopped by hand (``launch/mps.sh stop``), and a later call (the
    atexit hook, once this process's own CUDA context is gone) tries again. Never raises
    for a daemon that will not die: the run's result should not depend on it.
    """
    if handle is None or handle.stopped:
        return True
    if not handle.owned:
        handle.stopped = True
        return True
    plan = handle.plan
    control = os.path.join(plan.pipe_dir, "control")
    deadline = time.monotonic() + timeout_s
    handle.pid = handle.pid or _read_pid(plan.pipe_dir)
    try:
        subprocess.run([handle.control_bin], input="quit\n", env=_daemon_env(plan),
                       capture_output=True, text=True, timeout=max(timeout_s / 2, 0.1))
    except (subprocess.TimeoutExpired, OSError) as e:
        log.debug("mps: `echo quit | %s` failed: %s", handle.control_bin, e)
    gone = _wait_gone(handle, control, time.monotonic() + max(deadline - time.monotonic(), 0) / 2)
    if not gone and handle.pid and _is_control_daemon(handle.pid, handle.control_bin):
        try:
            os.kill(handle.pid, signal.SIGTERM)  # ours, and deaf to quit
        except OSError:  # exited in between
            pass
        gone = _wait_gone(handle, control, deadline)
    if not gone:
        log.warning("mps: the control daemon (pid %s) serving %s did not exit within %.1fs of "
                    "`quit`; stop it by hand: CUDA_MPS_PIPE_DIRECTORY=%s launch/mps.sh stop "
                    "(or kill %s). Log dir: %s", handle.pid, plan.pipe_dir, timeout_s,
                    plan.pipe_dir, handle.pid, plan.log_dir)
        return False
    handle.stopped = True
    shutil.rmtree(plan.private_root, ignore_errors=True)
    return True


def _is_control_daemon(pid: int, control_bin: str) -> bool:
    # Guard against a recycled pid before signalling anything.
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return os.path.basename(control_bin) in cmdline


def _main(argv: Sequence[str]) -> int:
    """``python -m colocate.mps_daemon probe [timeout_s]``: one client probe with this environment
    (what launch/mps.sh runs to check a daemon by hand). Exit 0 when a client connects."""
    if not argv or argv[0] != "probe":
        print("usage: python -m colocate.mps_daemon probe [timeout_s]", file=sys.stderr)
        return 2
    result = probe_client(os.environ, float(argv[1]) if len(argv) > 1 else 60.0)
    pipe = os.environ.get(PIPE_ENV, f"{DEFAULT_PIPE_DIR} (default)")
    print(f"{'ok' if result.ok else 'FAILED'}: {result.detail}; devices={result.num_devices} "
          f"gpu_mem_bytes={result.gpu_mem_bytes}; {PIPE_ENV}={pipe}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
