"""Export: reading a DCP checkpoint in one process, on every supported torch."""

import warnings

import torch
import torch.distributed.checkpoint as dcp

from colocate.draft import DraftArch, Eagle3Draft
from colocate.export import load_checkpoint_weights


def tiny_arch() -> DraftArch:
    return DraftArch(hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                     intermediate_size=24, rms_norm_eps=1e-6, rope_theta=10000.0,
                     rope_scaling=None, max_position_embeddings=64, target_vocab_size=40,
                     draft_vocab_size=10, num_aux=3)


def test_load_checkpoint_weights_with_torch_2_6_dcp_load(tmp_path, monkeypatch):
    arch = tiny_arch()
    model = Eagle3Draft(arch)
    model.init_weights(torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": expected here
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path))
    real_load = dcp.load

    def load_2_6(state_dict, *, checkpoint_id=None, storage_reader=None, planner=None,
                 process_group=None):  # torch 2.6's signature: no `no_dist`
        real_load(state_dict, checkpoint_id=checkpoint_id, storage_reader=storage_reader,
                  planner=planner, process_group=process_group)

    monkeypatch.setattr(dcp, "load", load_2_6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_checkpoint_weights(str(tmp_path), Eagle3Draft(arch))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
