"""Checkpoint bookkeeping that needs no process group: ordering, swaps, RNG round trip."""

import os

import torch

from colocate.train import checkpoint as ckpt


def _make(run_dir, step):
    path = os.path.join(ckpt.checkpoint_root(run_dir), f"{ckpt.PREFIX}{step:06d}")
    os.makedirs(path)
    open(os.path.join(path, "meta.json"), "w").write("{}")
    return path


def test_checkpoints_sorted_by_step_not_by_name(tmp_path):
    run = str(tmp_path)
    for step in (999999, 1000000, 50):
        _make(run, step)
    os.makedirs(os.path.join(ckpt.checkpoint_root(run), "step_000070.tmp"))  # incomplete
    found = [os.path.basename(p) for p in ckpt.list_checkpoints(run)]
    assert found == ["step_000050", "step_999999", "step_1000000"]
    assert ckpt.find_resume(run, "auto").endswith("step_1000000")


def test_replace_dir_swaps_and_keeps_no_leftovers(tmp_path):
    final, tmp = str(tmp_path / "out"), str(tmp_path / "out.tmp")
    os.makedirs(final)
    open(os.path.join(final, "old"), "w").write("old")
    os.makedirs(tmp)
    open(os.path.join(tmp, "new"), "w").write("new")
    ckpt.replace_dir(tmp, final)
    assert os.listdir(final) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_rng_state_round_trip():
    torch.manual_seed(123)
    state = ckpt._rng_state()
    want = torch.rand(4)
    torch.rand(10)
    ckpt._set_rng_state(state)
    assert torch.equal(torch.rand(4), want)


def test_clip_scales_and_zeroes_non_finite_steps():
    from colocate.train.trainer import clip_

    grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    clip_(grads, torch.tensor(5.0), max_norm=1.0)
    assert torch.allclose(torch.cat(grads), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])]
    clip_(grads, torch.tensor(float("inf")), max_norm=1.0)
    assert torch.equal(torch.cat(grads), torch.zeros(3))  # no nan left for AdamW
    grads = [torch.tensor([3.0, 4.0])]
    clip_(grads, torch.tensor(5.0), max_norm=0.0)  # 0: clipping off
    assert torch.equal(grads[0], torch.tensor([3.0, 4.0]))
