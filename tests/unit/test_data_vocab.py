"""Draft vocabulary: top loss-masked tokens, exact size, EAGLE3 d2t/t2d convention."""

from __future__ import annotations

import logging
import os

import torch

from colocate.config import DataSection
from colocate.data import DataStats, TokenizedDataset, load_or_build_tokenized
from colocate.data.vocab import load_or_build_vocab, select_draft_ids


def _check_consistent(vocab, size: int, target_vocab: int) -> None:
    assert vocab.d2t.dtype == torch.int64 and vocab.t2d.dtype == torch.bool
    assert vocab.d2t.shape == (size,) and vocab.t2d.shape == (target_vocab,)
    assert int(vocab.t2d.sum()) == size
    assert torch.equal(vocab.draft_ids, torch.arange(size) + vocab.d2t)
    assert torch.equal(vocab.t2d.nonzero().squeeze(1), vocab.draft_ids)  # ascending


def test_vocab_on_the_tiny_data(tiny_assets, tiny_tokenizer, tmp_path):
    cfg = DataSection(path=tiny_assets["data"], cache_dir=str(tmp_path))
    data = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    target_vocab = len(tiny_tokenizer)
    vocab = load_or_build_vocab(data, 64, target_vocab, str(tmp_path))
    _check_consistent(vocab, 64, target_vocab)
    counts = torch.bincount(data.ids[data.loss_mask].to(torch.int64), minlength=target_vocab)
    top = torch.sort(counts, descending=True, stable=True).indices[:64]
    assert set(top.tolist()) == set(vocab.draft_ids.tolist())
    assert vocab.t2d[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # Cached: the second call reads the entry instead of rewriting it.
    entries = [f for f in os.listdir(tmp_path) if f.startswith("vocab-")]
    assert len(entries) == 1
    mtime = os.stat(tmp_path / entries[0]).st_mtime_ns
    again = load_or_build_vocab(data, 64, target_vocab, str(tmp_path))
    assert torch.equal(again.d2t, vocab.d2t) and torch.equal(again.t2d, vocab.t2d)
    assert os.stat(tmp_path / entries[0]).st_mtime_ns == mtime


def test_ties_go_to_lower_ids_and_the_fill_makes_the_size_exact():
    #            masked: 7 x3, 2 x2, 9 x2, 4 x1; unmasked: 5 x4, 1 x1
    ids = torch.tensor([7, 7, 7, 2, 9, 2, 9, 4, 5, 5, 5, 5, 1], dtype=torch.int32)
    mask = torch.tensor([1] * 8 + [0] * 5, dtype=torch.bool)
    assert select_draft_ids(ids, mask, 2, 12).tolist() == [2, 7]  # 2 beats 9 on the tie
    assert select_draft_ids(ids, mask, 4, 12).tolist() == [2, 4, 7, 9]
    # 4 distinct trainable ids; then the most frequent overall (5, 1), then lowest ids (0, 3).
    assert select_draft_ids(ids, mask, 8, 12).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]


def test_oversized_draft_vocab_is_clamped_with_a_warning(tmp_path, caplog):
    ids = torch.tensor([3, 1, 3, 0], dtype=torch.int32)
    data = TokenizedDataset(ids, torch.tensor([1, 1, 1, 0], dtype=torch.bool),
                            torch.tensor([0, 4]), DataStats(), key="k" * 64)
    with caplog.at_level(logging.WARNING):
        vocab = load_or_build_vocab(data, 100, 6, str(tmp_path))
    assert "exceeds the target vocabulary" in caplog.text
    _check_consistent(vocab, 6, 6)
    assert vocab.d2t.tolist() == [0] * 6
