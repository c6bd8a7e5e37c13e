"""MPS lifecycle against a hand-written fake `nvidia-cuda-mps-control` and a fake client probe.

The fakes stand in for the two things this machine lacks (the MPS binary and a GPU). The
fake daemon really daemonizes, writes its pid file and control pipe after a delay, logs to
CUDA_MPS_LOG_DIRECTORY and exits on `echo quit | nvidia-cuda-mps-control`; the fake probe
answers 805 until the control pipe exists and for its first N calls, like a racing client.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings

import psutil
import pytest

from colocate import mps, mps_daemon
from colocate.config import MpsSection

FAKE_CONTROL = textwrap.dedent('''\
    #!{python}
    """Fake nvidia-cuda-mps-control. Knobs: FAKE_MPS_DELAY, FAKE_MPS_NEVER_READY,
    FAKE_MPS_REFUSE, FAKE_MPS_IGNORE_QUIT; FAKE_MPS_PIDS collects daemon pids for cleanup."""
    import os, subprocess, sys, time
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    logd = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
    control = os.path.join(pipe, "control")
    pidfile = os.path.join(pipe, "nvidia-cuda-mps-control.pid")

    def log(msg):
        with open(os.path.join(logd, "control.log"), "a") as f:
            f.write(msg + "\\n")

    if sys.argv[1:] == ["-d"]:
        if os.environ.get("FAKE_MPS_REFUSE"):
            print("An instance of this daemon is already running")
            sys.exit(1)
        subprocess.Popen([sys.executable, __file__, "--serve"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        sys.exit(0)
    if sys.argv[1:] == ["--serve"]:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        with open(os.environ["FAKE_MPS_PIDS"], "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        log(f"fake daemon starting, CUDA_VISIBLE_DEVICES={{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}}")
        if os.environ.get("FAKE_MPS_NEVER_READY"):
            log("fake daemon: server failed to initialise (simulated)")
        else:
            time.sleep(float(os.environ.get("FAKE_MPS_DELAY", "0.2")))
            os.mkfifo(control)
            log("fake daemon: control pipe ready")
        quit_flag = os.path.join(pipe, ".quit")
        for _ in range(600):  # never outlive the test session by much
            if os.path.exists(quit_flag) and not os.environ.get("FAKE_MPS_IGNORE_QUIT"):
                break
            time.sleep(0.05)
        for path in (control, pidfile, quit_flag):
            if os.path.exists(path):
                os.remove(path)
        log("fake daemon: exit")
        sys.exit(0)
    # Client mode: read commands from stdin.
    if "quit" in sys.stdin.read().split():
        if not os.path.exists(control):
            print("Cannot find MPS control daemon process")
            sys.exit(1)
        open(os.path.join(pipe, ".quit"), "w").close()
    ''')

FAKE_PROBE = textwrap.dedent('''\
    """Fake client probe. FAKE_PROBE_FAILS: first N calls answer 805; FAKE_PROBE_CODE: a
    hard error instead of success. Records the CUDA_VISIBLE_DEVICES it saw."""
    import os
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "")
    counter = os.environ["FAKE_PROBE_COUNTER"]
    n = int(open(counter).read() or 0) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(n))
    open(counter + ".cvd", "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    if not os.path.exists(os.path.join(pipe, "control")) or n <= int(os.environ.get("FAKE_PROBE_FAILS", "0")):
        print("colocate-mps-probe result=805 call=cuDevicePrimaryCtxRetain name=CUDA_ERROR_MPS_CONNECTION_FAILED devices=0 mem=0")
    elif os.environ.get("FAKE_PROBE_CODE"):
        print(f"colocate-mps-probe result={os.environ['FAKE_PROBE_CODE']} call=cuInit name=CUDA_ERROR_NO_DEVICE devices=0 mem=0")
    else:
        print(f"colocate-mps-probe result=0 call=cuMemFree_v2 name=? devices=2 mem={80 << 30}")
    ''')

GIB = 1 << 30


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Fake binary first on PATH, fake probe argv, env knobs reset; kills leftover daemons."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(FAKE_CONTROL.format(python=sys.executable))
    control.chmod(control.stat().st_mode | stat.S_IXUSR)
    probe = tmp_path / "fake_probe.py"
    probe.write_text(FAKE_PROBE)
    pids = tmp_path / "daemon.pids"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_PIDS", str(pids))
    monkeypatch.setenv("FAKE_PROBE_COUNTER", str(tmp_path / "probe.count"))
    for key in ("FAKE_MPS_DELAY", "FAKE_MPS_NEVER_READY", "FAKE_MPS_REFUSE", "FAKE_MPS_IGNORE_QUIT",
                "FAKE_PROBE_FAILS", "FAKE_PROBE_CODE", mps.PIPE_ENV, mps.LOG_ENV,
                *mps.ROLE_LIMIT_ENVS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")

    class Fake:
        tmp = tmp_path
        probe_argv = [sys.executable, str(probe)]

        @staticmethod
        def probes() -> int:
            return int((tmp_path / "probe.count").read_text())

        @staticmethod
        def daemon_pids() -> list[int]:
            return [int(p) for p in pids.read_text().split()] if pids.exists() else []

        @staticmethod
        def plan(mode="auto", **kw) -> mps.MpsPlan:
            # A short root: pytest's tmp_path can exceed the socket-path limit of the pipe dir.
            return mps.plan_from_config(MpsSection(mode=mode, **kw), "tok", tmp_dir=short_tmp)

    short_tmp = tempfile.mkdtemp(prefix="cmps", dir="/tmp")
    yield Fake
    shutil.rmtree(short_tmp, ignore_errors=True)
    for pid in Fake.daemon_pids():  # only the fake daemons this test started
        if mps_daemon._alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_long_pipe_dir_is_refused_with_the_fix(fake):
    plan = mps.plan_from_config(MpsSection(mode="required", pipe_dir="/tmp/" + "x" * 100), "tok")
    with pytest.raises(mps.MpsError, match="socket path limit. Set mps.pipe_dir"):
        mps_daemon.start_daemon(plan, timeout_s=1, probe_argv=fake.probe_argv)


def test_plan_uses_private_dirs_unless_pipe_dir_set(tmp_path):
    plan = mps.plan_from_config(MpsSection(), "tok", tmp_dir=str(tmp_path))
    root = str(tmp_path / "colocate-mps-tok")
    assert (plan.private_root, plan.pipe_dir, plan.log_dir) == (root, f"{root}/pipe", f"{root}/log")
    assert plan.env == {mps.PIPE_ENV: f"{root}/pipe", mps.LOG_ENV: f"{root}/log"}
    plan = mps.plan_from_config(MpsSection(pipe_dir="/run/mps"), "tok", tmp_dir=str(tmp_path))
    assert plan.pipe_dir == "/run/mps" and plan.log_dir == f"{root}/log"


def test_job_token_is_stable_safe_and_short():
    env = {"SLURM_JOB_ID": "123", "TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "29500"}
    assert mps.job_token(env) == f"{os.getuid()}-123-29500" == mps.job_token(dict(env))
    token = mps.job_token({"TORCHELASTIC_RUN_ID": "a/b c" * 20})
    assert len(token) <= 24 and "/" not in token and " " not in token
    assert mps.job_token({}) == f"{os.getuid()}-p{os.getppid()}"


def test_start_waits_for_pipe_retries_805_then_stop_cleans_up(fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_DELAY", "0.3")
    monkeypatch.setenv("FAKE_PROBE_FAILS", "2")
    plan = fake.plan()
    handle = mps_daemon.start_daemon(plan, timeout_s=10, probe_argv=fake.probe_argv)
    assert handle is not None and handle.owned and handle.pid in fake.daemon_pids()
    assert fake.probes() >= 3 and handle.gpu_mem_bytes == 80 * GIB and handle.num_devices == 2
    assert os.path.exists(os.path.join(plan.pipe_dir, "control"))
    # The daemon must see all GPUs; the probe sees what the rank sees.
    log_text = open(os.path.join(plan.log_dir, "control.log")).read()
    assert "CUDA_VISIBLE_DEVICES=<unset>" in log_text
    assert (fake.tmp / "probe.count.cvd").read_text() == "5,6"

    assert mps_daemon.stop_daemon(handle, timeout_s=5)
    assert not mps_daemon._alive(handle.pid)
    assert not os.path.exists(plan.private_root)
    assert mps_daemon.stop_daemon(handle, timeout_s=5)  # idempotent
    assert mps_daemon.stop_daemon(None)


def test_daemon_keeps_uuid_visible_devices(fake, monkeypatch):
    # By UUID the daemon's CUDA_VISIBLE_DEVICES remaps nothing, so it is kept: one daemon per
    # emulated node of a shared host serves only that node's GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234abcd")
    handle = mps_daemon.start_daemon(fake.plan(), timeout_s=10, probe_argv=fake.probe_argv)
    log_text = open(os.path.join(handle.plan.log_dir, "control.log")).read()
    assert "CUDA_VISIBLE_DEVICES=GPU-1234abcd" in log_text
    assert mps_daemon.stop_daemon(handle, timeout_s=5)


def test_existing_daemon_is_reused_and_not_owned(fake):
    plan = fake.plan(mode="required")
    owner = mps_daemon.start_daemon(plan, timeout_s=10, probe_argv=fake.probe_argv)
    user = mps_daemon.start_daemon(plan, timeout_s=10, probe_argv=fake.probe_argv)
    assert owner.owned and not user.owned and user.pid == owner.pid
    assert len(fake.daemon_pids()) == 1  # no second daemon was launched
    assert mps_daemon.stop_daemon(user, timeout_s=5)
    assert mps_daemon._alive(owner.pid) and os.path.exists(plan.pipe_dir)
    assert mps_daemon.stop_daemon(owner, timeout_s=5) and not mps_daemon._alive(owner.pid)


def test_daemon_that_never_comes_up_is_a_bounded_error(fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_NEVER_READY", "1")
    plan = fake.plan(mode="required")
    with pytest.raises(mps.MpsError) as err:
        mps_daemon.start_daemon(plan, timeout_s=1, probe_argv=fake.probe_argv)
    msg = str(err.value)
    assert f"waiting for the MPS control pipe {plan.pipe_dir}/control" in msg
    assert plan.log_dir in msg and "server failed to initialise (simulated)" in msg  # log tail
    assert "mps.mode=auto" in msg  # the fix
    # Nothing left behind: the daemon (deaf to quit without a control pipe) was terminated.
    assert not any(mps_daemon._alive(pid) for pid in fake.daemon_pids())
    assert not os.path.exists(plan.private_root)


def test_probe_that_keeps_failing_names_last_result(fake, monkeypatch):
    monkeypatch.setenv("FAKE_PROBE_FAILS", "1000000")
    plan = fake.plan(mode="required")
    with pytest.raises(mps.MpsError, match="waiting for an MPS client probe") as err:
        mps_daemon.start_daemon(plan, timeout_s=1.5, probe_argv=fake.probe_argv)
    # The last attempt may have been cut at the deadline; the 805 before it must still show.
    msg = str(err.value)
    assert "last probe:" in msg and "CUresult 805 (CUDA_ERROR_MPS_CONNECTION_FAILED)" in msg
    assert not any(mps_daemon._alive(pid) for pid in fake.daemon_pids())


def test_hard_probe_error_is_not_retried(fake, monkeypatch):
    monkeypatch.setenv("FAKE_PROBE_CODE", "100")
    with pytest.raises(mps.MpsError, match="probe failed: CUresult 100"):
        mps_daemon.start_daemon(fake.plan(mode="required"), timeout_s=30, probe_argv=fake.probe_argv)
    assert fake.probes() == 1


def test_auto_mode_warns_and_time_slices_without_the_binary(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    plan = fake.plan(mode="auto")
    with pytest.warns(RuntimeWarning, match="TIME-SLICE") as rec:
        handle = mps_daemon.start_daemon(plan, timeout_s=1, probe_argv=fake.probe_argv)
    assert handle is None and "nvidia-cuda-mps-control is not on PATH" in str(rec[0].message)
    status = mps.node_status(plan, handle)
    assert not status.active and "time-sliced" in status.reason


def test_auto_mode_falls_back_when_daemon_refuses(fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_REFUSE", "1")
    with pytest.warns(RuntimeWarning, match="exited 1: An instance of this daemon"):
        assert mps_daemon.start_daemon(fake.plan(), timeout_s=2, probe_argv=fake.probe_argv) is None


def test_required_mode_raises_naming_the_fix(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mps.MpsError, match="(?s)not on PATH.*mps.mode=auto.*mps.mode=off"):
        mps_daemon.start_daemon(fake.plan(mode="required"), timeout_s=1, probe_argv=fake.probe_argv)


def test_off_mode_starts_nothing_and_drops_our_pipe_dir(fake, monkeypatch):
    plan = fake.plan(mode="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mps_daemon.start_daemon(plan, timeout_s=1, probe_argv=fake.probe_argv) is None
    assert fake.daemon_pids() == [] and not (fake.tmp / "probe.count").exists()
    status = mps.node_status(plan, None)
    assert not status.active and status.reason == "mps.mode=off"
    # A leftover pointing at a colocate-private dir is dropped; a foreign one is kept.
    monkeypatch.setenv(mps.PIPE_ENV, plan.pipe_dir)
    monkeypatch.setenv(mps.LOG_ENV, "/var/log/site-mps")
    assert mps.activate(status, "trainer") == {}
    assert mps.PIPE_ENV not in os.environ and os.environ[mps.LOG_ENV] == "/var/log/site-mps"


def test_stop_terminates_a_daemon_deaf_to_quit(fake, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_IGNORE_QUIT", "1")
    plan = fake.plan()
    handle = mps_daemon.start_daemon(plan, timeout_s=10, probe_argv=fake.probe_argv)
    assert mps_daemon.stop_daemon(handle, timeout_s=1)
    assert not mps_daemon._alive(handle.pid) and not os.path.exists(plan.private_root)


def test_role_env_values():
    plan = mps.plan_from_config(MpsSection(trainer_sm_percent=60, engine_sm_percent=80,
                                    trainer_mem_fraction=0.45, engine_mem_fraction=0.4,
                                    pinned_mem_limit=True), "tok")
    assert mps.role_env(plan, "trainer") == {mps.SM_ENV: "60"}  # memory size not known yet
    plan = mps.node_status(plan, mps_daemon.DaemonHandle(plan, True, "x", gpu_mem_bytes=80 * GIB)).plan
    assert mps.role_env(plan, "trainer", device=1) == {mps.SM_ENV: "60", mps.PINNED_ENV: "1=36864M"}
    assert mps.role_env(plan, "engine") == {mps.SM_ENV: "80", mps.PINNED_ENV: "0=32768M"}
    no_pin = mps.plan_from_config(MpsSection(), "tok")
    assert mps.role_env(no_pin, "engine") == {mps.SM_ENV: "100"}
    assert mps.role_env(mps.plan_from_config(MpsSection(mode="off"), "tok"), "trainer") == {}
    with pytest.raises(ValueError, match="role 'draft'"):
        mps.role_env(no_pin, "draft")
    low = mps.plan_from_config(MpsSection(trainer_priority="low"), "tok")
    assert mps.role_env(low, "trainer") == {mps.SM_ENV: "100", mps.PRIORITY_ENV: "1"}
    assert mps.role_env(low, "engine") == {mps.SM_ENV: "100"}  # the engine keeps normal
    low = mps.plan_from_config(MpsSection(engine_priority="low"), "tok")
    assert mps.role_env(low, "engine") == {mps.SM_ENV: "100", mps.PRIORITY_ENV: "1"}
    assert mps.role_env(low, "trainer") == {mps.SM_ENV: "100"}


def test_role_limits_never_reach_the_daemon_or_its_probe(fake, monkeypatch):
    # In the daemon's env a client limit would become the server's default for every client.
    for key in mps.ROLE_LIMIT_ENVS:
        monkeypatch.setenv(key, "1")
    plan = fake.plan()
    for env in (mps_daemon._daemon_env(plan), mps_daemon._probe_env(plan)):
        assert not set(mps.ROLE_LIMIT_ENVS) & env.keys()


def test_activate_sets_pipe_dir_and_role_limits(fake):
    plan = fake.plan(trainer_sm_percent=70, pinned_mem_limit=True)
    status = mps.node_status(plan, mps_daemon.DaemonHandle(plan, True, "x", gpu_mem_bytes=80 * GIB))
    status = pickle.loads(pickle.dumps(status))  # it travels between ranks
    env = mps.activate(status, "trainer", device=1)
    assert env == {mps.PIPE_ENV: plan.pipe_dir, mps.LOG_ENV: plan.log_dir, mps.SM_ENV: "70",
                   mps.PINNED_ENV: "1=36864M"}
    assert all(os.environ[k] == v for k, v in env.items())
    with pytest.raises(ValueError):
        mps.activate(status, "both")


def test_sm_share_checks():
    assert mps.check_sm_shares(MpsSection()) == []  # 100 + 100: work-conserving default
    # A cap on either role: its GEMMs are checked at start-up (gemm_check.py); say so.
    [msg] = mps.check_sm_shares(MpsSection(trainer_sm_percent=100, engine_sm_percent=60))
    assert "mps.engine_sm_percent (60) < 100" in msg and "checks the GEMM shapes its role runs" in msg
    trainer, engine = mps.check_sm_shares(MpsSection(trainer_sm_percent=70, engine_sm_percent=60))
    assert "mps.trainer_sm_percent (70) < 100" in trainer and "engine_sm_percent (60)" in engine
    msg, _, _ = mps.check_sm_shares(MpsSection(trainer_sm_percent=30, engine_sm_percent=40))
    assert "30% of the SMs stay idle" in msg
    [msg] = mps.check_sm_shares(MpsSection(mode="off", engine_sm_percent=50))
    assert "mps.engine_sm_percent is ignored" in msg
    with pytest.warns(UserWarning, match="stay idle"):
        mps.plan_from_config(MpsSection(trainer_sm_percent=10, engine_sm_percent=10), "tok")


def test_real_probe_reports_instead_of_raising():
    # The real ctypes probe on this host (no GPU here: no libcuda, or no device).
    result = mps_daemon.probe_client(os.environ, timeout_s=60)
    assert isinstance(result, mps_daemon.ProbeResult)
    if not result.ok:
        assert result.cu_result not in mps_daemon._RETRYABLE and result.detail


def test_trainer_memory_cap():
    calls = []

    class FakeCuda:
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def set_per_process_memory_fraction(fraction, device):
            calls.append((fraction, device))

    assert mps.apply_trainer_memory_cap(0.45, 3, cuda_api=FakeCuda)
    assert not mps.apply_trainer_memory_cap(0.0, 3, cuda_api=FakeCuda)
    assert calls == [(0.45, 3)]
    import torch
    assert mps.apply_trainer_memory_cap(0.45, 0) is torch.cuda.is_available()
    with pytest.raises(ValueError, match="trainer_mem_fraction"):
        mps.apply_trainer_memory_cap(1.5, 0, cuda_api=FakeCuda)


def test_daemon_processes_are_gone(fake):
    # Guard for the fixture itself: nothing from earlier tests may linger in this session.
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "--serve" in (p.info["cmdline"] or []) and
                 any("nvidia-cuda-mps-control" in c for c in p.info["cmdline"])]
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in leftovers)


FAKE_LIBCUDA = r"""
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
static uint64_t last_alloc;
static int err(const char *name) { const char *v = getenv(name); return v ? atoi(v) : 0; }
int cuInit(unsigned flags) { return flags == 0 ? 0 : 1; }
int cuDeviceGetCount(int *n) { *n = 2; return 0; }
int cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
int cuDeviceTotalMem_v2(size_t *bytes, int dev) { *bytes = (size_t)(80 + dev) << 30; return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int dev) { *ctx = (void *)0x1000; return err("FAKE_CU_RETAIN_ERR"); }
int cuCtxSetCurrent(void *ctx) { return 0; }
int cuMemAlloc_v2(uint64_t *ptr, size_t bytes) { *ptr = last_alloc = 0x7f0000000000ull + bytes; return 0; }
int cuMemFree_v2(uint64_t ptr) { return ptr == last_alloc ? 0 : 1; }  /* 64-bit pointer intact */
int cuDevicePrimaryCtxRelease_v2(int dev) { return 0; }
int cuGetErrorName(int code, const char **s) {
    *s = code == 805 ? "CUDA_ERROR_MPS_CONNECTION_FAILED" : "CUDA_ERROR_OTHER"; return 0; }
"""


@pytest.fixture
def fake_libcuda(tmp_path, monkeypatch):
    """The real ctypes probe against a compiled stand-in for libcuda.so.1 (needs a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a fake libcuda")
    src = tmp_path / "fake_cuda.c"
    src.write_text(FAKE_LIBCUDA)
    lib = tmp_path / "libcuda.so.1"
    assert subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)]).returncode == 0
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    monkeypatch.delenv("FAKE_CU_RETAIN_ERR", raising=False)
    return lib


def test_real_probe_script_against_fake_libcuda(fake_libcuda, monkeypatch):
    result = mps_daemon.probe_client(os.environ, timeout_s=60)
    assert result.ok and result.num_devices == 2 and result.gpu_mem_bytes == 80 * GIB  # min
    monkeypatch.setenv("FAKE_CU_RETAIN_ERR", "805")
    result = mps_daemon.probe_client(os.environ, timeout_s=60)
    assert not result.ok and result.cu_result == 805
    assert result.detail == "CUresult 805 (CUDA_ERROR_MPS_CONNECTION_FAILED) from cuDevicePrimaryCtxRetain"


def test_launch_helper_start_status_stop(fake, monkeypatch):
    """launch/mps.sh keeps the same dirs convention and lifecycle as the module."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "mps.sh")
    root = os.path.join(fake.plan().private_root.rsplit("/", 1)[0], "colocate-mps-manual")
    monkeypatch.setenv("TMPDIR", os.path.dirname(root))
    monkeypatch.setenv("COLOCATE_MPS_TOKEN", "manual")
    monkeypatch.setenv("MPS_TIMEOUT_S", "10")
    monkeypatch.setenv("MPS_PROBE_CMD", " ".join(fake.probe_argv))
    monkeypatch.setenv("FAKE_PROBE_FAILS", "1")

    def run(cmd):
        return subprocess.run(["bash", script, cmd], capture_output=True, text=True, timeout=30)

    started = run("start")
    assert started.returncode == 0, started.stderr
    assert os.path.exists(f"{root}/pipe/control") and run("pipe").stdout.strip() == f"{root}/pipe"
    [pid] = fake.daemon_pids()
    assert "CUDA_VISIBLE_DEVICES=<unset>" in open(f"{root}/log/control.log").read()
    assert f"pid {pid} (running)" in run("status").stdout
    # The module reuses a hand-started daemon and leaves it running.
    plan = mps.plan_from_config(MpsSection(mode="required", pipe_dir=f"{root}/pipe"), "x",
                                tmp_dir=os.path.dirname(root))
    handle = mps_daemon.start_daemon(plan, timeout_s=10, probe_argv=fake.probe_argv)
    assert not handle.owned and mps_daemon.stop_daemon(handle) and mps_daemon._alive(pid)
    stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not mps_daemon._alive(pid) and not os.path.exists(root)


def test_a_dead_jobs_daemon_is_stopped_by_the_next_job(fake):
    from colocate import mps_owner

    tmp = os.path.dirname(fake.plan().private_root)
    # A job that starts its daemon and is then SIGKILLed: no atexit, the daemon stays.
    script = textwrap.dedent(f"""
        import os, signal, sys
        from colocate import mps, mps_daemon
        from colocate.config import MpsSection
        plan = mps.plan_from_config(MpsSection(mode="required"), "dead", tmp_dir={tmp!r})
        mps_daemon.start_daemon(plan, timeout_s=20, probe_argv={fake.probe_argv!r})
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    [record] = mps_owner.read_records(tmp)
    assert mps_daemon._alive(record.daemon_pid) and record.daemon_pid in fake.daemon_pids()
    assert [r.path for r in mps_owner.stale_records(tmp)] == [record.path]

    # The next job on the node stops it before starting its own, and records itself.
    plan = fake.plan(mode="required")
    handle = mps_daemon.start_daemon(plan, timeout_s=20, probe_argv=fake.probe_argv)
    assert not mps_daemon._alive(record.daemon_pid)
    assert not os.path.exists(record.private_root)
    [mine] = mps_owner.read_records(tmp)
    assert mine.owner_pid == os.getpid() and mine.daemon_pid == handle.pid
    assert mps_owner.stale_records(tmp) == []  # a live owner's daemon is not stale
    assert mps_owner.stop_stale_daemons(tmp) == [] and mps_daemon._alive(handle.pid)
    assert mps_daemon.stop_daemon(handle, timeout_s=5) and mps_owner.read_records(tmp) == []


def test_doctor_reports_a_stale_record_without_touching_it(tmp_path):
    from colocate import doctor, mps_owner

    root = tmp_path / "colocate-mps-gone"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid whose process has exited
    path = mps_owner.write_record(str(root), daemon_pid=None, pipe_dir=str(root / "pipe"),
                                  control_bin="nvidia-cuda-mps-control")
    ctx = doctor.Ctx("cpu", "auto", 10.0)
    assert doctor.check_mps_stale(ctx, str(tmp_path))[0].status == doctor.OK  # ours: alive
    record = json.load(open(path))
    record["owner_pid"] = dead.pid
    json.dump(record, open(path, "w"))
    [result] = doctor.check_mps_stale(ctx, str(tmp_path))
    assert result.status == doctor.WARN and f"started by pid {dead.pid} (gone)" in result.detail
    assert f"CUDA_MPS_PIPE_DIRECTORY={root / 'pipe'} launch/mps.sh stop" in result.detail
    assert os.path.exists(path)
