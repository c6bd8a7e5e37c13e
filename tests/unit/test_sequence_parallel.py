"""Ulysses sequence parallelism (colocate/sequence_parallel.py): two real gloo ranks train
the chunks of one packed micro-batch; their summed loss, statistics and gradients equal
the whole micro-batch's on one rank (float32, rel 1e-5), on documents that cross the chunk
boundary, with the padding sequence. (The loop attention: flex has no backward on the CPU,
and tests/unit/test_draft_flex.py holds the two paths equal on whatever bounds they get.)"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.draft.loss import eagle3_unroll, label_counts
from colocate.draft.teacher import target_distribution
from colocate.sequence_parallel import (SpChunk, check_heads, chunk_features, gather_rows,
                                        gather_token_rows, heads_to_seq, seq_to_heads)
from tests.gloo_ranks import finish_rank, run_ranks

SHAPE = dict(hidden_size=32, num_attention_heads=8, num_key_value_heads=4, intermediate_size=48,
             vocab_size=120, num_hidden_layers=4)  # GQA groups of 2, split in 2 or 4
DRAFT_VOCAB, UNROLL = 60, 3
# 4 documents, 37 tokens. Two ranks: padded to 38, chunks [0, 19) and [19, 38); the second
# document (7..22) crosses the boundary, and so does the reach of the halo into the third.
# Four: padded to 40 (3 padding tokens), chunks of 10, the second document in three.
SEQ_LENS = [7, 16, 9, 5]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n, hidden = sum(SEQ_LENS), SHAPE["hidden_size"]
    mask = torch.rand(n, generator=gen) < 0.7
    return {"input_ids": torch.randint(0, SHAPE["vocab_size"], (n,), generator=gen),
            "positions": torch.cat([torch.arange(k) for k in SEQ_LENS]),
            "loss_mask": mask, "seq_lens": torch.tensor(SEQ_LENS, dtype=torch.int32),
            "aux_hidden": torch.randn(n, 3 * hidden, generator=gen),
            "last_hidden": torch.randn(n, hidden, generator=gen)}


def _run(model: Eagle3Draft, feats: dict, offset: int, label_totals: torch.Tensor):
    gen = torch.Generator().manual_seed(1)
    embed = torch.randn(SHAPE["vocab_size"], SHAPE["hidden_size"], generator=gen)
    head = torch.randn(SHAPE["vocab_size"], SHAPE["hidden_size"], generator=gen)
    target = target_distribution(feats["last_hidden"], head, torch.arange(DRAFT_VOCAB))
    result = eagle3_unroll(model, embed, feats["aux_hidden"], target, feats["input_ids"],
                           feats["loss_mask"], feats["positions"], feats["seq_lens"].tolist(),
                           UNROLL, 0.8, label_totals=label_totals, offset=offset)
    result.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return result, grads


def _model(attention: str) -> Eagle3Draft:
    arch = DraftArch.from_target_config(
        LlamaConfig(**SHAPE), DraftSection(draft_vocab_size=DRAFT_VOCAB, intermediate_size=48), 3)
    model = Eagle3Draft(arch, attention=attention, kernels="eager")
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _worker(rank: int, init_method: str, out: str, attention: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    whole = _batch()
    totals = label_counts(whole["seq_lens"], whole["loss_mask"], UNROLL)

    reference, ref_grads = _run(_model(attention), whole, 0, totals)  # every rank, alone

    model = _model(attention)
    model.use_sequence_parallel(dist.group.WORLD)
    feats, (start, end) = chunk_features(whole, SpChunk(rank, world, halo=UNROLL + 1))
    chunk, grads = _run(model, feats, start, totals)
    summed = {}
    for name, value in [("loss", chunk.loss.detach()), ("ce_sum", chunk.ce_sum.detach()),
                        ("hits", chunk.hits), ("counted", chunk.counted), ("sim", chunk.sim),
                        *[(f"grad.{n}", g) for n, g in grads.items()]]:
        value = value.double()
        dist.all_reduce(value)
        summed[name] = value.tolist()
    expect = {"loss": reference.loss.item(), "ce_sum": reference.ce_sum.tolist(),
              "hits": reference.hits.tolist(), "counted": reference.counted.tolist(),
              "sim": reference.sim.tolist(),
              **{f"grad.{n}": g.double().tolist() for n, g in ref_grads.items()}}
    finish_rank(out, rank, {"summed": summed, "expect": expect, "chunk": [start, end],
                            "rows": feats["input_ids"].numel()})


@pytest.mark.parametrize("world", [2, 4])
def test_chunks_equal_the_whole_micro_batch(tmp_path, world, attention="loop"):
    size = -(-sum(SEQ_LENS) // world)
    for rank, got in enumerate(run_ranks(_worker, world, tmp_path, attention, world)):
        assert got["chunk"] == [rank * size, (rank + 1) * size]
        assert got["rows"] == size + UNROLL + 1  # the chunk and its halo
        assert got["summed"].keys() == got["expect"].keys()
        for key, want in got["expect"].items():
            have = torch.tensor(got["summed"][key], dtype=torch.float64)
            want = torch.tensor(want, dtype=torch.float64)
            assert torch.allclose(have, want, rtol=1e-5, atol=1e-7), (key, have, want)
        assert got["expect"]["counted"][0] > 0 and got["expect"]["sim"][0] > 0


def _all_to_all_worker(rank: int, init_method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(3)
    whole = torch.randn(6, 4, 2, generator=gen)  # [T, H, D] of both ranks
    mine = whole[3 * rank:3 * rank + 3].clone().requires_grad_()
    by_heads = seq_to_heads(mine, dist.group.WORLD)
    back = heads_to_seq(by_heads, dist.group.WORLD)
    (by_heads * (rank + 1)).sum().backward()
    finish_rank(out, rank, {
        "by_heads": torch.equal(by_heads, whole[:, 2 * rank:2 * rank + 2]),
        "back": torch.equal(back, mine),
        "grad": torch.equal(mine.grad, torch.cat([torch.ones(3, 2, 2), 2 * torch.ones(3, 2, 2)],
                                                 1))})


def test_all_to_all_exchanges_tokens_for_heads_and_back(tmp_path):
    for got in run_ranks(_all_to_all_worker, 2, tmp_path):
        assert got == {"by_heads": True, "back": True, "grad": True}


def _gather_worker(rank: int, init_method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    mine = (torch.arange(6.).view(3, 2) + 10 * rank).requires_grad_()
    whole = gather_rows(mine, dist.group.WORLD)
    # Rank r's loss weighs the gathered rows by (r + 1) * (row index + 1): each rank's rows
    # must get the sum of both ranks' weights, 3 * (row index + 1).
    weights = (rank + 1) * torch.arange(1., 7.)[:, None].expand(6, 2)
    (whole * weights).sum().backward()
    ids, mask = gather_token_rows([torch.tensor([[1, 2], [3, 4]]) + 10 * rank,
                                   torch.tensor([True, rank == 1])], dist.group.WORLD)
    finish_rank(out, rank, {"whole": whole.tolist(), "grad": mine.grad.tolist(),
                            "ids": ids.tolist(), "mask": mask.tolist(),
                            "dtypes": [str(ids.dtype), str(mask.dtype)]})


def test_gather_rows_gathers_in_rank_order_and_reduce_scatters_the_gradient(tmp_path):
    for rank, got in enumerate(run_ranks(_gather_worker, 2, tmp_path)):
        assert got["whole"] == [[0, 1], [2, 3], [4, 5], [10, 11], [12, 13], [14, 15]]
        assert got["grad"] == [[3 * (3 * rank + i + 1)] * 2 for i in range(3)]
        assert got["ids"] == [[1, 2], [3, 4], [11, 12], [13, 14]]
        assert got["mask"] == [True, False, True, True]
        assert got["dtypes"] == ["torch.int64", "torch.bool"]


def test_chunk_geometry_pads_with_one_sequence_and_zero_halo_rows():
    feats, bounds = chunk_features(_batch(), SpChunk(1, 2, halo=4))
    assert bounds == [19, 38]
    assert feats["seq_lens"].tolist() == SEQ_LENS + [1]
    assert feats["positions"].tolist() == list(range(12, 16)) + list(range(9)) + list(range(5)) + [0]
    assert feats["aux_hidden"].shape[0] == 19 and feats["last_hidden"].shape[0] == 23
    assert not feats["loss_mask"][18:].any()  # the padding token and the halo past the end
    assert feats["input_ids"][18:].tolist() == [0] * 5


def test_heads_that_do_not_split_are_refused_with_the_key():
    check_heads(8, 4, 2)
    with pytest.raises(ValueError, match=r"train.sp_size: 4 does not divide the draft's 8 "
                                         r"attention heads and 2 key/value heads.*\[1, 2\]"):
        check_heads(8, 2, 4)
