"""Sampler order, packing, and exact resumption of the micro-batch stream."""

from __future__ import annotations

import pytest
import torch

from colocate.config import DataSection
from colocate.data import (DataError, DataStats, DataStream, ShardedSampler, TokenizedDataset,
                           load_or_build_tokenized)


def _synthetic(num_sequences: int = 37, seed: int = 0) -> TokenizedDataset:
    """A small dataset of random lengths whose ids encode (sequence, position)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (num_sequences,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    ids = torch.cat([i * 1000 + torch.arange(int(n)) for i, n in enumerate(lengths)])
    mask = torch.rand(ids.numel(), generator=g) < 0.5
    return TokenizedDataset(ids.to(torch.int32), mask, offsets, DataStats(), key="synthetic")


def _stream(data, **kw) -> DataStream:
    args = dict(seed=3, shuffle=True, shard_index=0, num_shards=1, tokens_per_micro_step=64)
    return DataStream(data, **{**args, **kw})


def test_sampler_is_deterministic_per_seed_and_epoch():
    a = ShardedSampler(50, seed=1, shuffle=True, shard_index=0, num_shards=1)
    b = ShardedSampler(50, seed=1, shuffle=True, shard_index=0, num_shards=1)
    c = ShardedSampler(50, seed=2, shuffle=True, shard_index=0, num_shards=1)
    assert torch.equal(a.epoch_order(0), b.epoch_order(0))
    assert not torch.equal(a.epoch_order(0), a.epoch_order(1))
    assert not torch.equal(a.epoch_order(0), c.epoch_order(0))
    assert sorted(a.epoch_order(4).tolist()) == list(range(50))
    plain = ShardedSampler(50, seed=1, shuffle=False, shard_index=0, num_shards=1)
    assert plain.epoch_order(3).tolist() == list(range(50))
    walked = [a.advance() for _ in range(120)]  # endless: wraps into epochs 1 and 2
    assert walked == (a.epoch_order(0).tolist() + a.epoch_order(1).tolist()
                      + a.epoch_order(2).tolist()[:20])
    assert a.state() == {"epoch": 2, "cursor": 20}


@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_cover_each_epoch(shuffle):
    n, num_shards = 23, 4
    for epoch in (0, 1):
        orders = [ShardedSampler(n, seed=5, shuffle=shuffle, shard_index=i,
                                 num_shards=num_shards).epoch_order(epoch).tolist()
                  for i in range(num_shards)]
        flat = [x for order in orders for x in order]
        assert sorted(flat) == list(range(n))  # disjoint and complete
        assert max(map(len, orders)) - min(map(len, orders)) <= 1


def test_more_shards_than_sequences_is_an_error():
    with pytest.raises(DataError, match="5 sequences cannot be split over 8 shards"):
        _stream(_synthetic(5), num_shards=8)


def test_packing_respects_budget_positions_and_order():
    data = _synthetic()
    stream = _stream(data)
    lengths = data.lengths()
    for _ in range(30):
        batch = stream.next_micro_batch()
        t = batch.num_tokens
        assert t <= 64 and int(batch.seq_lens.sum()) == t
        assert batch.input_ids.dtype == torch.int64 and batch.positions.dtype == torch.int64
        assert batch.seq_lens.dtype == torch.int32 and batch.loss_mask.dtype == torch.bool
        expected_pos = torch.cat([torch.arange(int(n)) for n in batch.seq_lens])
        assert torch.equal(batch.positions, expected_pos)  # reset to 0 at each start
        ids = torch.cat([data.sequence(int(i))[0] for i in batch.indices]).to(torch.int64)
        mask = torch.cat([data.sequence(int(i))[1] for i in batch.indices])
        assert torch.equal(batch.input_ids, ids) and torch.equal(batch.loss_mask, mask)
        # Greedy: the next sequence in order would not have fit.
        assert t + int(lengths[stream.sampler.peek()]) > 64
        assert batch.end_state == stream.sampler.state()


def test_resumed_stream_yields_the_same_micro_batches():
    data = _synthetic()
    for num_shards, shard_index in ((1, 0), (3, 2)):
        kw = dict(num_shards=num_shards, shard_index=shard_index)
        reference = _stream(data, **kw)
        expected = [reference.next_micro_batch() for _ in range(40)]  # several epochs
        assert expected[-1].epoch >= 2
        first = _stream(data, **kw)
        got = [first.next_micro_batch() for _ in range(9)]
        saved = first.state()
        resumed = _stream(data, **kw)
        resumed.load_state(saved)
        got += [resumed.next_micro_batch() for _ in range(31)]
        for a, b in zip(expected, got):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.indices, b.indices)
            assert torch.equal(a.loss_mask, b.loss_mask) and a.end_state == b.end_state


def test_state_of_another_stream_is_refused():
    saved = _stream(_synthetic(), num_shards=2).state()
    with pytest.raises(DataError, match="num_shards: saved 2, now 1"):
        _stream(_synthetic()).load_state(saved)
    with pytest.raises(DataError, match="seed: saved 3, now 4"):
        _stream(_synthetic(), num_shards=2, seed=4).load_state(saved)


def test_stream_over_the_tiny_data(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = DataSection(path=tiny_assets["data"], cache_dir=str(tmp_path),
                      max_length=256, tokens_per_micro_step=512)
    data = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    seen = []
    for shard in range(2):
        stream = _stream(data, shard_index=shard, num_shards=2, tokens_per_micro_step=512)
        shard_seen = []
        while len(shard_seen) < stream.sampler.shard_len:  # the last batch may cross epochs
            batch = stream.next_micro_batch()
            assert batch.num_tokens <= 512 and batch.loss_mask.any()
            shard_seen += batch.indices.tolist()
        seen += shard_seen[:stream.sampler.shard_len]
    assert sorted(seen) == list(range(data.num_sequences))
