"""Dummy target tables (target.load_format=dummy) are drawn on the host, so a trainer and an
engine that see different SM counts (an MPS SM cap) still share the same target."""

import torch

from colocate import target
from colocate.target import dummy_embed, dummy_embed_and_head


def test_dummy_tables_are_the_host_generators_draw_whatever_the_chunking(monkeypatch):
    vocab, hidden = 130, 64
    embed, head = dummy_embed_and_head(vocab, hidden, seed=3, dtype=torch.bfloat16,
                                       device=torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    whole = torch.empty(2 * vocab, hidden).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
    assert torch.equal(embed, whole[:vocab]) and torch.equal(head, whole[vocab:])
    assert embed.dtype == torch.bfloat16 and not embed.requires_grad
    # Another chunk size (as for a wide target) draws the same numbers.
    monkeypatch.setattr(target, "_DUMMY_CHUNK_ELEMENTS", 48 * hidden)
    again = dummy_embed_and_head(vocab, hidden, seed=3, dtype=torch.bfloat16,
                                 device=torch.device("cpu"))
    assert torch.equal(again[0], embed) and torch.equal(again[1], head)
    # The engines draw the embedding alone: the same table.
    assert torch.equal(dummy_embed(vocab, hidden, seed=3, dtype=torch.bfloat16,
                                   device=torch.device("cpu")), embed)
    other = dummy_embed_and_head(vocab, hidden, seed=4, dtype=torch.bfloat16,
                                 device=torch.device("cpu"))
    assert not torch.equal(other[0], embed)
