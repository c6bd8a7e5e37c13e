"""`colocate doctor`: the command on this (CPU) machine, and its formatting / exit logic."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from colocate import doctor
from colocate.doctor import FAIL, OK, SKIP, WARN, Ctx, Result

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _doctor(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COLOCATE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "colocate", "doctor", *argv], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def _line(stdout: str, name: str) -> str:
    hits = [ln for ln in stdout.splitlines() if ln[7:].split("  ")[0].strip() == name]
    assert len(hits) == 1, f"no single line for {name!r} in:\n{stdout}"
    return hits[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="expects a CPU-only host")
class TestOnCpuHost:
    def test_device_cpu_passes(self):
        proc = _doctor("--device", "cpu", "--timeout", "120")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        for name in ("python", "torch", "transformers", "safetensors", "psutil"):
            assert _line(out, name).startswith("[ OK ]")
        assert _line(out, "sglang").startswith(("[ OK ]", "[ -- ]"))
        shm = _line(out, "shm ring")
        assert shm.startswith("[ OK ]") and "20 steps" in shm and "MB verified" in shm
        assert _line(out, "gpu").startswith("[ -- ]")
        assert _line(out, "cuda ipc ring").startswith("[ -- ]")
        last = out.splitlines()[-1]
        assert last.startswith("doctor: ") and last.endswith(": ready")

    def test_device_cuda_fails_naming_cuda(self):
        proc = _doctor("--device", "cuda", "--timeout", "120")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        gpu = _line(proc.stdout, "gpu")
        assert gpu.startswith("[FAIL]") and "CUDA" in gpu and "(required)" in gpu
        assert _line(proc.stdout, "shm ring").startswith("[ OK ]")  # the rest still ran
        assert "NOT READY" in proc.stdout.splitlines()[-1]

    def test_mps_required_fails_clearly(self):
        proc = _doctor("--device", "cpu", "--mps", "required", "--timeout", "120")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        daemon = _line(proc.stdout, "mps daemon")
        assert daemon.startswith("[FAIL]") and "MPS needs a GPU" in daemon
        assert "mps daemon" in proc.stdout.splitlines()[-1]


# --------------------------------------------------------------------------- formatting / exit


def test_format_result_tags_and_required_mark():
    assert doctor.format_result(Result("gpu", OK, "1 visible")).startswith("[ OK ] gpu ")
    assert doctor.format_result(Result("x", SKIP, "why")).startswith("[ -- ] x ")
    assert doctor.format_result(Result("x", WARN, "w", True)).startswith("[WARN] x ")
    assert doctor.format_result(Result("x", FAIL, "boom", True)).endswith("boom (required)")
    assert doctor.format_result(Result("x", FAIL, "boom", False)).endswith("boom")


def test_summarize_exit_code_only_for_required_failures():
    ok = [Result("a", OK, ""), Result("b", WARN, "", True), Result("c", SKIP, "", True)]
    line, code = doctor.summarize(ok)
    assert code == 0 and line.endswith(": ready")
    assert "1 ok, 1 warnings, 0 failed, 1 skipped" in line
    line, code = doctor.summarize(ok + [Result("numa", FAIL, "oops", False)])
    assert code == 0 and "not required" in line
    line, code = doctor.summarize(ok + [Result("shm ring", FAIL, "x", True),
                                        Result("gpu", FAIL, "y", True)])
    assert code == 1 and "NOT READY (required: shm ring, gpu)" in line


def _ctx(**kw) -> Ctx:
    return Ctx(**{"device": "cpu", "mps": "auto", "timeout_s": 5.0, **kw})


def test_run_check_turns_exceptions_into_fail_lines():
    def broken(ctx):
        raise RuntimeError("sysfs went away\nsecond line")

    [r] = doctor.run_check("numa", broken, _ctx(), required=False)
    assert (r.name, r.status, r.required) == ("numa", FAIL, False)
    assert r.detail == "RuntimeError: sysfs went away"


def test_run_check_bounds_time_and_fills_required():
    t0 = time.monotonic()
    [r] = doctor.run_check("slow", lambda ctx: time.sleep(30), _ctx(timeout_s=0.3), required=True)
    assert time.monotonic() - t0 < 5
    assert r.status == FAIL and r.required and "0.3s" in r.detail
    results = doctor.run_check("v", lambda ctx: [Result("a", OK, ""), Result("b", FAIL, "", True)],
                               _ctx(), required=False)
    assert [r.required for r in results] == [False, True]  # a check's own choice wins


def test_checks_requiredness_follows_flags():
    def required(ctx):
        return {name: req for name, _, req in doctor.checks(ctx)}

    cpu = required(_ctx())
    assert cpu["shm ring"] and not cpu["gpu"] and not cpu["cuda ipc ring"] and not cpu["mps"]
    gpu = required(_ctx(device="auto", num_gpus=1, mps="required"))
    assert gpu["cuda ipc ring"] and gpu["mps"] and not gpu["numa"] and not gpu["gpu"]
    assert required(_ctx(device="cuda"))["gpu"]


def test_cuda_ring_without_gpu_is_skipped_unless_cuda_was_asked_for():
    [r] = doctor.check_cuda_ring(_ctx(device="auto"))
    assert r.status == SKIP
    [r] = doctor.check_cuda_ring(_ctx(device="cuda"))
    assert r.status == FAIL and "CUDA" in r.detail


def test_mps_failures_are_warnings_unless_required(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name, *a, **k: None)
    auto = doctor.check_mps(_ctx(device="auto"))
    assert auto[0].status == WARN and auto[1].status == SKIP
    req = doctor.check_mps(_ctx(device="auto", mps="required"))
    assert [r.status for r in req] == [FAIL, FAIL]
    assert doctor.check_mps(_ctx(mps="off"))[0].status == SKIP


def test_allocator_warns_on_expandable_segments(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert doctor.check_allocator(_ctx())[0].status == OK
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    [r] = doctor.check_allocator(_ctx())
    assert r.status == WARN and "PYTORCH_ALLOC_CONF" in r.detail and "outside" in r.detail


def test_version_parsing():
    assert doctor._version_tuple("2.13.0+cpu") == (2, 13)
    assert doctor._version_tuple("2.6.0a0+git123") == (2, 6)
    assert doctor._version_tuple("5.12.1") == (5, 12)


def test_stale_daemons_are_reported_before_the_mps_check_starts_one():
    # Starting a daemon stops stale ones (as every job's start does): measured on the H200,
    # with the old order the stale daemon was cleaned silently and then reported as absent.
    names = [name for name, _, _ in doctor.checks(_ctx(device="auto", num_gpus=1))]
    assert names.index("mps stale") < names.index("mps")
