"""The launcher's pre-flight (`colocate check`, issue 16 item 1): launch/train.sh refuses a
bad config, path or rank count before torchrun starts a single rank."""

import os
import subprocess
import sys

import pytest

from tests.integration.test_train import CONFIG, REPO, tiny_overrides


def launch(*args, nproc=4):
    env = dict(os.environ, NPROC=str(nproc), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "launch/train.sh", "--config", CONFIG, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, nproc, message", [
    (["train.max_stepz=3"], 4, "train.max_stepz: unknown key; did you mean train.max_steps?"),
    (["train.max_steps=0", "train.epochs=0"], 4,
     "train.max_steps: neither it nor train.epochs is set; set one of them"),
    ([], 3, "--nproc-per-node 3: colocate runs a trainer and an engine per GPU; use an even "
            "number >= 2"),
    (["train.sp_size=2"], 6, "train.sp_size: 2 does not divide the 3 GPU(s) per node "
                             "(--nproc-per-node 6, a trainer and an engine per GPU): a "
                             "sequence-parallel group must lie on one node; use one of [1, 3]"),
    (["data.path=nowhere.jsonl"], 4, f"data.path nowhere.jsonl (looked for "
                                     f"{REPO}/nowhere.jsonl; relative paths resolve from the "
                                     f"working directory {REPO}): no such file"),
])
def test_the_launcher_refuses_before_torchrun(tiny_assets, tmp_path, extra, nproc, message):
    proc = launch(*tiny_overrides(tiny_assets, str(tmp_path / "run"), *extra), nproc=nproc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("colocate check: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    # torchrun never ran: no rank said anything, nothing was written.
    assert "colocate train" not in proc.stderr and "torch.distributed" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_a_good_config_passes_without_torch(tiny_assets, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    (export / "model.safetensors").write_bytes(b"")
    code = ("import sys; from colocate.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)")
    base = [sys.executable, "-c", code, "check", "--config", CONFIG, "--nproc", "4", "--gpus",
            "0", *tiny_overrides(tiny_assets, str(tmp_path / "run"))]
    ok = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == (f"colocate check: ok (eagle3, 60 steps, run.dir "
                                 f"{tmp_path / 'run'}, 4 ranks)")
    # draft.init_from: the export's files and architecture, still without torch.
    bad = subprocess.run(base + [f"draft.init_from={export}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert (f"colocate check: error: draft.init_from {export}/config.json: architectures "
            "['Qwen3ForCausalLM'], not [LlamaForCausalLMEagle3]; draft.method=eagle3 "
            "warm-starts from a LlamaForCausalLMEagle3 export" in bad.stderr)


def test_dflash_with_sequence_parallelism_passes(tiny_assets, tmp_path):
    # Refused until DFlash trained under train.sp_size > 1; now only the geometry is checked.
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", "check", "--config", CONFIG, "--nproc", "4", "--gpus",
         "0", *tiny_overrides(tiny_assets, str(tmp_path / "run"), "draft.method=dflash",
                              "train.sp_size=2")],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("colocate check: ok (dflash, 60 steps"), proc.stdout
