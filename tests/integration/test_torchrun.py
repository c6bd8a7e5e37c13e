"""Process groups and the selftest, started with torchrun on CPU (gloo)."""

import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(nproc, *args, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))


def test_role_groups_hold_only_their_role(tmp_path):
    proc = torchrun(6, "tests/integration/torchrun_groups.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {r["rank"]: r for r in
               (json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json")))}
    assert sorted(reports) == list(range(6))
    for rank, r in reports.items():
        assert r["role"] == ("trainer" if rank % 2 == 0 else "engine")
        assert r["peer"] == rank ^ 1 and r["peer_pid_ok"]
        same_role = [0, 2, 4] if rank % 2 == 0 else [1, 3, 5]
        assert r["role_members"] == same_role
        assert r["role_sum"] == sum(same_role)   # a collective on `trainer` involves trainers
        assert r["role_rank"] == rank // 2


def test_selftest_passes_and_reports():
    proc = torchrun(4, "-m", "colocate", "selftest", "--device", "cpu", "--steps", "12",
                    "--bytes", "300000", "--slots", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "backend=shm slots=3" in lines[0]
    rows = [l.split() for l in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[1] == "12" and r[-1] == "OK" for r in rows)


def test_odd_world_size_fails_with_one_line():
    proc = torchrun(3, "-m", "colocate", "selftest", "--device", "cpu", timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate selftest: error:")]
    assert len(lines) == 1 and "world size 3 is odd" in lines[0]
