"""Many nodes on one machine: two torchrun agents (`--nnodes 2`, c10d rendezvous on
localhost), each acting as one node with one trainer/engine pair, as a cluster runs them.

A node's own view of the filesystem is its working directory: relative paths resolve from
it (`describe_path` in colocate/config/parse.py), so an agent started in another directory sees what a node without the shared
mount (or with its own copy of a file) sees, through the same code path.
"""

import os
import socket
import subprocess
import sys

import pytest

from tests.integration.test_train import CONFIG, REPO, metrics, tiny_overrides, torchrun_train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(overrides, cwds, timeout=240):
    """Run `colocate train` as two torchrun agents of one job (2 ranks each), agent i in
    cwds[i]; returns [(returncode, stdout, stderr)] per agent. Bounded: an agent still
    running after `timeout` s fails the test, naming it."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=t{port}",
           "-m", "colocate", "train", "--config", CONFIG, *overrides]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cwd in cwds]
    results = []
    try:
        for i, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"torchrun agent {i} (cwd {cwds[i]}) still running after {timeout} s")
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return results


def the_one_error(results) -> str:
    """Both agents failed, and exactly one colocate error line was printed: that line."""
    assert all(code != 0 for code, _, _ in results)
    lines = error_lines(results)
    assert len(lines) == 1, "\n".join(r[2][-3000:] for r in results)
    return lines[0]


def error_lines(results):
    return [line for _, _, err in results for line in err.splitlines()
            if line.startswith("colocate train: error:")]


def test_two_agents_train_exactly_like_one(tiny_assets, tmp_path):
    # Same 4 ranks, as one agent and as two "nodes": the same losses to the bit, and an export.
    common = ["train.max_steps=3", "draft.unroll_steps=2", "checkpoint.every_steps=0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    proc = torchrun_train(tiny_overrides(tiny_assets, one, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = two_agents(tiny_overrides(tiny_assets, two, *common), [REPO, REPO])
    assert [r[0] for r in results] == [0, 0], "\n".join(r[2][-3000:] for r in results)
    assert "2 pair(s) on 2 node(s)" in "".join(r[2] for r in results)
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert os.path.isfile(os.path.join(two, "export", "model.safetensors"))


def test_node_with_other_data_is_refused_naming_the_rank(tiny_assets, tmp_path):
    # Both nodes read data.path=conversations.jsonl, but one node's copy holds other
    # conversations: the config is the same, the data key and the draft vocabulary are not.
    lines = open(tiny_assets["data"]).read().splitlines(keepends=True)
    cwds = [tmp_path / "node_a", tmp_path / "node_b"]
    for cwd, part in zip(cwds, (lines, lines[:40])):
        cwd.mkdir()
        (cwd / "conversations.jsonl").write_text("".join(part))
    overrides = tiny_overrides(tiny_assets, str(tmp_path / "run"), "train.max_steps=2",
                               "data.path=conversations.jsonl")
    results = two_agents(overrides, [str(c) for c in cwds], timeout=180)
    lines = [the_one_error(results)]
    assert lines[0].startswith("colocate train: error: [rank 0] trainers disagree on what they "
                               "train: trainer rank 2 on node 1 (")
    assert "the data key" in lines[0] and "the draft vocabulary (sha" in lines[0]
    assert "the config" not in lines[0]  # same config on both nodes
    assert not os.path.exists(tmp_path / "run" / "config.yaml")  # refused: nothing recorded


def test_node_without_the_run_dir_fails_fast(tiny_assets, tmp_path):
    # run.dir=runs/x resolves on each node; only one node's directory is the one rank 0 uses.
    cwds = [tmp_path / "node_a", tmp_path / "node_b"]
    for cwd in cwds:
        cwd.mkdir()
    overrides = tiny_overrides(tiny_assets, "runs/x", "train.max_steps=2")
    results = two_agents(overrides, [str(c) for c in cwds], timeout=120)
    lines = [the_one_error(results)]
    assert lines[0].startswith("colocate train: error: [rank 0] run.dir is not shared: ranks 2-3 "
                               "on node 1 (")
    assert "put run.dir on a shared filesystem" in lines[0]
    # Before any model or group of the run: the probe is gone and no run dir was left behind.
    assert not any(os.path.exists(c / "runs") for c in cwds)
    assert "Root Cause" in "".join(r[2] for r in results)
