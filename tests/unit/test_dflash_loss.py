"""DFlash objective: anchors, the block mask, labels and weights, the chunked loss, stats."""

import math

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
import torch.nn.functional as F

from colocate import metrics
from colocate.draft.dflash_blocks import (BlockLayout, block_label_counts,
                                          block_labels_and_weights, dense_block_mask,
                                          draw_anchors, flex_block_mask)
from colocate.draft.dflash_loss import dflash_forward
from tests.unit.test_dflash_model import H, MASK_ID, V, make_draft


# ------------------------------------------------------------------ anchors


def test_anchors_are_valid_sorted_padded_and_seeded():
    seq_lens = [10, 3, 8, 2]
    loss_mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 1, 1,   1, 1, 1,
                              1, 0, 1, 1, 1, 1, 1, 1,   1, 0], dtype=torch.bool)
    # p valid iff mask[p] & mask[p+1], p+1 in the sequence.
    valid = [{2, 3, 6, 7, 8}, {0, 1}, {2, 3, 4, 5, 6}, set()]

    def draw(seed, n=3):
        return draw_anchors(loss_mask, seq_lens, n, torch.Generator().manual_seed(seed))
    anchors = draw(0)
    assert anchors.shape == (4, 3) and anchors.dtype == torch.long
    for row, ok in zip(anchors.tolist(), valid):
        real = [a for a in row if a >= 0]
        assert row == real + [-1] * (3 - len(real))  # valid first, padded with -1
        assert real == sorted(set(real)) and set(real) <= ok
        assert len(real) == min(3, len(ok))
    assert torch.equal(draw(0), anchors)
    assert any(not torch.equal(draw(s), anchors) for s in (1, 2, 3))
    assert [set(r) - {-1} for r in draw(0, n=8).tolist()] == valid  # fewer: all of them
    # One generator per sequence: a sample's anchors do not depend on its neighbours.
    per_seq = draw_anchors(loss_mask, seq_lens, 3, [torch.Generator().manual_seed(s) for s in range(4)])
    alone = draw_anchors(loss_mask[:10], [10], 3, [torch.Generator().manual_seed(0)])
    assert torch.equal(per_seq[0], alone[0])


# ------------------------------------------------------------------ mask

SEQ_LENS = [4, 6, 3]
ANCHORS = torch.tensor([[1, 2, -1], [0, 3, 4], [-1, -1, -1]])
BLOCK = 3


def hand_built_mask(seq_lens, anchors, block):
    num_ctx = sum(seq_lens)
    num_seqs, num_anchors = anchors.shape
    num_q = num_seqs * num_anchors * block
    mask = torch.zeros(num_q, num_ctx + num_q, dtype=torch.bool)
    start = 0
    for s in range(num_seqs):
        for n in range(num_anchors):
            a, j = int(anchors[s, n]), s * num_anchors + n
            if a < 0:
                continue
            for k in range(block):
                q = j * block + k
                for t in range(start, start + a):  # strict: context before the anchor
                    mask[q, t] = True
                for k2 in range(block):  # the whole own block, both directions
                    mask[q, num_ctx + j * block + k2] = True
        start += seq_lens[s]
    return mask


def test_dense_mask_equals_hand_built():
    mask = dense_block_mask(SEQ_LENS, ANCHORS, BLOCK)
    assert torch.equal(mask, hand_built_mask(SEQ_LENS, ANCHORS, BLOCK))
    num_ctx = 13
    # Spot checks: anchor 0 sees no context; anchor (1, 1) = packed 4 + 3 sees 4, 5, 6 only;
    # padded anchors see nothing; block 0 never sees sequence 1's context or block 1.
    assert not mask[9:12, :num_ctx].any()
    assert mask[12, :num_ctx].nonzero().flatten().tolist() == [4, 5, 6]
    assert not mask[6:9].any() and not mask[18:].any()
    assert mask[0].nonzero().flatten().tolist() == [0, num_ctx + 0, num_ctx + 1, num_ctx + 2]


@pytest.mark.parametrize("sparse_block", [4, 8, 128])
def test_flex_block_mask_matches_dense(sparse_block):
    dense = dense_block_mask(SEQ_LENS, ANCHORS, BLOCK)
    block_mask = flex_block_mask(SEQ_LENS, ANCHORS, BLOCK, sparse_block_size=sparse_block)
    num_q, num_kv = dense.shape
    q_idx, kv_idx = torch.arange(num_q)[:, None], torch.arange(num_kv)[None, :]
    assert torch.equal(block_mask.mask_mod(None, None, q_idx, kv_idx), dense)
    # Block tables: every tile holding an allowed pair is listed (partial or full), and a
    # tile listed as full holds only allowed pairs.
    nq, nk = -(-num_q // sparse_block), -(-num_kv // sparse_block)
    padded = torch.zeros(nq * sparse_block, nk * sparse_block, dtype=torch.bool)
    padded[:num_q, :num_kv] = dense
    tiles = padded.view(nq, sparse_block, nk, sparse_block).permute(0, 2, 1, 3)
    listed = block_mask.to_dense()[0, 0, :nq, :nk].bool()
    assert torch.equal(listed, tiles.any(-1).any(-1))
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for row in range(nq):
        count = int(block_mask.full_kv_num_blocks[0, 0, row])
        full[row, block_mask.full_kv_indices[0, 0, row, :count].long()] = True
    assert not (full & ~tiles.all(-1).all(-1)).any()


# ------------------------------------------------------------------ labels and weights


def test_labels_and_weights_hand_computed():
    input_ids = torch.arange(10, 19)
    loss_mask = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    anchors = torch.tensor([[1, 2], [1, -1]])
    labels, weights = block_labels_and_weights(input_ids, loss_mask, [5, 4], anchors, 4, gamma=2.0)
    d = math.exp(-0.5)  # k = 2; k = 3 would weigh exp(-1)
    # block (a=1): x2 x3 (x4 not trained); (a=2): x3 (x4 untrained, x5 is the next
    # sequence's); seq 1 (a=1, packed 6): x7 x8 (packed 9 is past the end); padded: none.
    assert labels.tolist() == [[12, 13, 0], [13, 0, 0], [17, 18, 0], [0, 0, 0]]
    torch.testing.assert_close(weights, torch.tensor(
        [[1, d, 0], [1, 0, 0], [1, d, 0], [0, 0, 0]], dtype=torch.float32))
    assert block_label_counts(loss_mask, [5, 4], anchors, 4).tolist() == [3, 2, 0]


def test_block_inputs_are_anchor_then_mask_tokens():
    layout = BlockLayout.build([5, 4], torch.tensor([[1, 3], [2, -1]]), 3)
    ids, pos = layout.block_inputs(torch.arange(10, 19), torch.tensor([0, 1, 2, 3, 4, 7, 8, 9, 10]), 99)
    assert ids.tolist() == [11, 99, 99, 13, 99, 99, 17, 99, 99, 99, 99, 99]
    assert pos.tolist() == [1, 2, 3, 3, 4, 5, 9, 10, 11, 7, 8, 9]


# ------------------------------------------------------------------ loss


def batch(seed=0, seq_lens=(12, 9), num_anchors=4, block=4):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(seq_lens)
    ids = torch.randint(0, V - 1, (num_tokens,), generator=gen)
    loss_mask = torch.rand(num_tokens, generator=gen) > 0.2
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    anchors = draw_anchors(loss_mask, seq_lens, num_anchors, torch.Generator().manual_seed(seed))
    return dict(target_hidden=torch.randn(num_tokens, 3 * H, generator=gen), input_ids=ids,
                loss_mask=loss_mask, positions=positions, seq_lens=list(seq_lens),
                anchors=anchors)


def head_weights(seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5


def run(model, data, **kw):
    embed, head = head_weights()
    model.zero_grad()
    result = dflash_forward(model, embed, head, **data, gamma=2.0, **kw)
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_and_stats_against_full_logits_reference():
    model = make_draft(block_size=4, attention="loop")
    data = batch()
    result, _ = run(model, data, chunk_tokens=5)
    embed, head = head_weights()
    layout = BlockLayout.build(data["seq_lens"], data["anchors"], 4)
    ids, pos = layout.block_inputs(data["input_ids"], data["positions"], MASK_ID)
    with torch.no_grad():
        out = model(embed[ids], pos, model.project_context(data["target_hidden"]),
                    data["positions"], layout.dense_mask())
    logits = (out.view(layout.num_blocks, 4, H)[:, 1:] @ head.T)  # [NB, 3, V]
    labels, weights = layout.labels_and_weights(data["input_ids"], data["loss_mask"], 2.0)
    ce = F.cross_entropy(logits.reshape(-1, V), labels.flatten(), reduction="none").view_as(weights)
    counted = weights > 0
    torch.testing.assert_close(result.loss.detach(), (weights * ce).sum() / weights.sum())
    hits = (logits.argmax(-1) == labels) & counted
    lead = hits.long().cumprod(1).sum(1)
    expected = torch.cat([(ce * counted).sum(0).double(), hits.sum(0).double(),
                          counted.sum(0).double(),
                          torch.tensor([(layout.valid * (1 + lead)).sum(), layout.valid.sum()]).double()])
    torch.testing.assert_close(result.stats(), expected)
    assert len(result.stats()) == metrics.stats_length(3)


def test_chunking_does_not_change_loss_or_grads():
    model = make_draft(block_size=4, attention="loop")
    data = batch(seed=1)
    (r1, g1), (r2, g2) = run(model, data, chunk_tokens=3), run(model, data, chunk_tokens=4096)
    torch.testing.assert_close(r1.loss, r2.loss)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=lambda m: f"{name}: {m}")


def test_flex_path_equals_dense_path(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    data = batch(seed=2)
    dense, dense_grads = run(make_draft(block_size=4, attention="loop"), data)
    flex, flex_grads = run(make_draft(block_size=4, attention="flex"), data)
    torch.testing.assert_close(flex.loss, dense.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex.stats(), dense.stats(), rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_label_totals_normalise_over_the_whole_step():
    model = make_draft(block_size=4, attention="loop")
    parts = [batch(seed=3), batch(seed=4, seq_lens=(7, 11, 5))]
    totals = sum(block_label_counts(p["loss_mask"], p["seq_lens"], p["anchors"], 4) for p in parts)
    step_w = sum(math.exp(-k / 2.0) * int(n) for k, n in enumerate(totals.tolist()))
    results = [run(model, p, label_totals=totals)[0] for p in parts]
    alone = [run(model, p)[0] for p in parts]
    # Each micro-step's loss is its weighted CE sum over the step's weight total.
    own_w = [sum(math.exp(-k / 2.0) * int(n) for k, n in enumerate(r.counted.tolist())) for r in alone]
    for r, a, w in zip(results, alone, own_w):
        torch.testing.assert_close(r.loss, a.loss * w / step_w)
    one = run(model, parts[0], label_totals=results[0].counted)[0]
    torch.testing.assert_close(one.loss, alone[0].loss)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = make_draft(num_layers=1, block_size=4, attention="loop")
    data = batch(seed=5, num_anchors=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    embed, head = head_weights()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        result = dflash_forward(model, embed, head, **data, gamma=2.0)
        result.loss.backward()
        opt.step()
        losses.append(result.loss.item())
    stats = result.stats()
    acc = stats[3:6].sum() / stats[6:9].sum()
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert acc > 0.9 and metrics.accept_length(*stats[9:].tolist()) > 2.5, stats


# ------------------------------------------------------------------ validation replays serving


def _first_prediction(model, data, embed, head, seq_start, p):
    """The draft's prediction for x_{p+1} from the block anchored at packed index p."""
    anchors = torch.full((len(data["seq_lens"]), 1), -1)
    seq = next(s for s, start in enumerate(seq_start) if start <= p < start +
               data["seq_lens"][s])
    anchors[seq, 0] = p - seq_start[seq]
    layout = BlockLayout.build(data["seq_lens"], anchors, 4)
    ids, pos = layout.block_inputs(data["input_ids"], data["positions"], MASK_ID)
    with torch.no_grad():
        out = model(embed[ids], pos, model.project_context(data["target_hidden"]),
                    data["positions"], layout.dense_mask())
    # One anchor column: the block's index is its sequence's.
    return int((out.view(layout.num_blocks, 4, H)[seq, 1] @ head.T).argmax())


def test_validation_replays_serving_exactly():
    """Held-out micro-steps get a block at every valid position and replay serving: each
    reply's verify cycles start where the last stopped (brute force here: one block at a
    time), not a mean over random blocks. The replies are the draft's own first-position
    predictions, so every cycle accepts at least one draft and some accept more."""
    from colocate.config import load_config
    from colocate.data.packing import MicroBatch
    from colocate.draft.dflash_recipe import DFlashRecipe
    from colocate.draft.recipe import FrozenTarget, StepKey

    model = make_draft(block_size=4, attention="loop")
    embed, head = head_weights()
    seq_lens = [14, 11]
    data = batch(seed=3, seq_lens=seq_lens)
    mask = torch.zeros(sum(seq_lens), dtype=torch.bool)
    mask[4:14] = True    # sequence 0: prompt 0..3, reply 4..13
    mask[17:25] = True   # sequence 1: prompt 14..16, reply 17..24
    data["loss_mask"] = mask
    starts = [0, 14]
    for p in list(range(4, 13)) + list(range(17, 24)):  # the draft's greedy replies
        data["input_ids"][p + 1] = _first_prediction(model, data, embed, head, starts, p)

    cfg = load_config(None, ["draft.method=dflash", "draft.block_size=4",
                             "draft.num_anchors=3", "draft.block_decay=2.0"])
    recipe = DFlashRecipe(cfg)
    micro = MicroBatch(input_ids=data["input_ids"], positions=data["positions"],
                       loss_mask=mask, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                       indices=torch.arange(2), epoch=0, start_state={}, end_state={})
    meta, _ = recipe.plan_batch(micro, StepKey(seed=0, step=-1, micro=0, shard=0))
    assert meta["anchors"] == [list(range(4, 13)), list(range(3, 10))]  # every valid one
    feats = dict(aux_hidden=data["target_hidden"], input_ids=data["input_ids"],
                 loss_mask=mask, positions=data["positions"])
    got = recipe.forward(model, FrozenTarget(embed=embed, lm_head=head, draft_ids=None),
                         feats, {**meta, "split": "val", "seq_lens": seq_lens})

    def lead(p):  # accepted drafts of the block anchored at packed index p
        seq = 0 if p < 14 else 1
        anchors = torch.full((2, 1), -1)
        anchors[seq, 0] = p - starts[seq]
        one = dflash_forward(model, embed, head, data["target_hidden"], data["input_ids"],
                             mask, data["positions"], seq_lens, anchors, gamma=2.0)
        return int(one.sim[0]) - 1

    tokens = cycles = 0
    leads = []
    for a, b in ((4, 14), (17, 25)):  # serve each reply: x_a from the prefill
        tokens += b - a
        c = a
        while c < b - 1:
            leads.append(lead(c))
            c = min(c + leads[-1] + 1, b - 1)
            cycles += 1
    assert min(leads) >= 1 and max(leads) >= 2  # the replay is not trivial
    assert got.sim.tolist() == [tokens, cycles]
