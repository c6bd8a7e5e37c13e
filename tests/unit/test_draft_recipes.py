"""Draft recipes: what each method asks of the engine, plans per micro-batch, and reports."""

import pytest
import torch

from colocate.config import load_config
from colocate.data.packing import MicroBatch, positions_from_lens
from colocate.draft.dflash_blocks import block_label_counts
from colocate.draft.dflash_recipe import padded_anchors
from colocate.draft.recipe import StepKey, recipe_for
from colocate.metrics import stats_vector


def _batch(lens, masked_from=1):
    lens_t = torch.tensor(lens)
    mask = torch.cat([torch.arange(n) >= masked_from for n in lens])
    num = int(lens_t.sum())
    return MicroBatch(input_ids=torch.arange(num) % 50, positions=positions_from_lens(lens_t),
                      loss_mask=mask, seq_lens=lens_t.to(torch.int32),
                      indices=torch.arange(len(lens)), epoch=0, start_state={}, end_state={})


def _recipe(method, *overrides):
    return recipe_for(load_config(None, [f"draft.method={method}", *overrides]))


def test_each_method_declares_its_layers_and_ring_tensors():
    eagle3, dflash = _recipe("eagle3"), _recipe("dflash")
    assert eagle3.layer_ids(36) == [1, 17, 32]
    assert dflash.layer_ids(36) == [1, 9, 17, 25, 33]  # DESIGN section 9, K = 5
    assert "last_hidden" in eagle3.feature_needs(8, 3, torch.float32)
    needs = dflash.feature_needs(8, 5, torch.float32)
    assert "last_hidden" not in needs and needs["aux_hidden"].shape == ("T", 40)
    assert (eagle3.served_algorithm, dflash.served_algorithm) == ("EAGLE3", "DFLASH")
    assert dflash.num_positions == 15 and eagle3.num_positions == 7


def test_dflash_anchors_repeat_for_the_same_key_and_change_with_the_step():
    recipe = _recipe("dflash", "draft.num_anchors=4", "draft.block_size=4")
    batch = _batch([20, 13])
    key = StepKey(seed=3, step=7, micro=1, shard=0)
    (a, counts_a), (b, _) = recipe.plan_batch(batch, key), recipe.plan_batch(batch, key)
    assert a == b
    other, _ = recipe.plan_batch(batch, StepKey(seed=3, step=8, micro=1, shard=0))
    assert other != a
    anchors = padded_anchors(a["anchors"], 4)
    assert anchors.shape == (2, 4) and (anchors >= 0).all()  # both sequences have >= 4 valid
    # Anchors p need loss_mask[p] and loss_mask[p + 1] inside the sequence: p in 1..len-2.
    assert all(1 <= p <= 18 for p in a["anchors"][0]) and all(1 <= p <= 11 for p in a["anchors"][1])
    assert torch.equal(counts_a, block_label_counts(batch.loss_mask, batch.seq_lens, anchors, 4))


def test_padded_anchors_keep_short_rows_padded():
    out = padded_anchors([[2, 5], []], 3)
    assert out.tolist() == [[2, 5, -1], [-1, -1, -1]]


def test_dflash_summary_is_one_weighted_mean_eagle3_a_sum_of_means():
    ce, hits, counted = torch.tensor([4.0, 9.0]), torch.tensor([1, 1]), torch.tensor([2, 3])
    values = stats_vector(ce, hits, counted, torch.tensor([5, 2])).tolist()
    dflash = _recipe("dflash", "draft.block_size=3", "draft.block_decay=2.0").summary(values)
    w1 = torch.exp(torch.tensor(-0.5)).item()  # block position 2 weighs exp(-(2-1)/2)
    assert dflash["loss"] == pytest.approx((4.0 + w1 * 9.0) / (2 + w1 * 3))
    assert dflash["loss_1"] == pytest.approx(3.0) and dflash["acc_0"] == pytest.approx(0.5)
    assert dflash["sim_accept_length"] == pytest.approx(2.5)
    eagle3 = _recipe("eagle3", "draft.unroll_steps=2", "draft.position_decay=0.5").summary(values)
    assert eagle3["loss"] == pytest.approx(2.0 + 0.5 * 3.0)


def test_an_unknown_method_names_the_key():
    cfg = load_config(None)
    cfg.draft.method = "medusa"  # past validation, as a hand-edited run config could be
    with pytest.raises(ValueError, match="draft.method: 'medusa'"):
        recipe_for(cfg)


def test_dflash_training_flops_counted_by_hand():
    from colocate.metrics import Geometry, dflash_train_flops_per_token

    g = Geometry(hidden_size=4, intermediate_size=8, num_layers=6, num_heads=2, num_kv_heads=1,
                 head_dim=2, vocab_size=10)
    # seq 8, 2 anchors (0.25 per token), block 4: 1 block row per token, 3/4 of them predict.
    got = dflash_train_flops_per_token(g, 8, num_layers=1, block_size=4, num_anchors=2,
                                       num_context=3)
    context = 6 * (3 * 16 + 1 * 2 * 4 * 1 * 2)  # fc 3H x H, one layer's k/v of the context
    layer = 4 * (2 + 2) * 2 + 2 * 2 * 4 + 3 * 4 * 8  # q/k/v, o, MLP
    blocks = 1 * (6 * layer + 3 * 4 * 2 * 2 * (4.5 + 4))  # attention: half of 8 (+.5) + block
    head = 0.75 * 4 * 4 * 10
    assert got == pytest.approx(context + blocks + head)
