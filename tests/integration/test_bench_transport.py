"""The transport benchmark runs through the real ring and prints its table."""

import subprocess
import sys


def test_bench_transport_prints_table():
    proc = subprocess.run([sys.executable, "-m", "colocate.bench", "transport", "--sizes-mb",
                           "1,4", "--iters", "3", "--backend", "shm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["backend", "payload", "p50", "us", "p99", "us", "GB/s"]
    rows = [l.split() for l in lines[2:]]
    assert [r[0] for r in rows] == ["shm", "shm"] and [r[1] for r in rows] == ["1", "4"]
    assert all(float(r[3]) > 0 and float(r[-1]) > 0 for r in rows)
