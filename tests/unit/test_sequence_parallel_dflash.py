"""DFlash under sequence parallelism (colocate/sequence_parallel.py, colocate/draft/dflash.py):
real gloo ranks each train the blocks anchored in their chunk of one packed micro-batch,
gathering the context keys/values of the group in every layer; their summed loss,
statistics and gradients equal the whole micro-batch's on one rank (float32, rel 1e-5), for
training and for validation's serving replay, through the recipe as the trainer calls it."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from colocate.config import load_config
from colocate.data.packing import MicroBatch
from colocate.draft.dflash_blocks import block_label_counts
from colocate.draft.dflash_recipe import DFlashRecipe, padded_anchors
from colocate.draft.recipe import FrozenTarget, StepKey
from colocate.sequence_parallel import SpChunk, chunk_features
from tests.gloo_ranks import finish_rank, run_ranks
from tests.unit.test_dflash_loss import head_weights
from tests.unit.test_dflash_model import H, V, make_draft, qwen3_config

BLOCK, NUM_ANCHORS = 4, 3
# 4 documents, 37 tokens, starting at 0, 9, 23 and 29. Two ranks: padded to 38, chunks
# [0, 19) and [19, 38). Document 1 (9..22) crosses the boundary: the labels of its block
# anchored at 18 lie in the next chunk (19..21), and its block anchored at 20 reads context
# of both chunks. Four ranks: padded to 40, chunks of 10; the last chunk (document 3's
# prompt and the padding) has no anchor at all, so that rank trains a padded block.
SEQ_LENS = [9, 14, 6, 8]
PROMPTS = [(0, 2), (9, 11), (23, 24), (30, 37)]  # [start, end) of the unmasked tokens
TRAIN_ANCHORS = [[2, 5, 7], [3, 9, 11], [1, 4], []]  # offsets within each document


def _micro_batch() -> tuple[MicroBatch, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    num_tokens = sum(SEQ_LENS)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    for start, end in PROMPTS:
        mask[start:end] = False
    batch = MicroBatch(input_ids=torch.randint(0, V - 1, (num_tokens,), generator=gen),
                       positions=torch.cat([torch.arange(n) for n in SEQ_LENS]), loss_mask=mask,
                       seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32),
                       indices=torch.arange(len(SEQ_LENS)), epoch=0, start_state={},
                       end_state={})
    return batch, torch.randn(num_tokens, 3 * H, generator=gen)


def _forward(recipe, model, feats: dict, meta: dict, label_totals=None):
    """One micro-step as the trainer runs it: (stats, gradients; none for validation)."""
    embed, head = head_weights()
    frozen = FrozenTarget(embed=embed, lm_head=head, draft_ids=None)
    if meta.get("split") == "val":
        with torch.no_grad():
            return recipe.forward(model, frozen, feats, meta).stats(), {}
    model.zero_grad()
    result = recipe.forward(model, frozen, feats, meta, label_totals=label_totals)
    result.loss.backward()
    grads = {f"grad.{n}": p.grad.double() for n, p in model.named_parameters()}
    return torch.cat([result.loss.detach().double()[None], result.stats()]), grads


def _worker(rank: int, init_method: str, out: str, world: int, attention: str) -> None:
    torch.set_num_threads(1)
    if attention == "flex":  # eager flex on the CPU, as tests/unit/test_dflash_loss.py runs it
        import torch.nn.attention.flex_attention as flex_module

        flex_module._validate_device = lambda *args: None
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    recipe = DFlashRecipe(load_config(None, [
        "draft.method=dflash", f"draft.block_size={BLOCK}", f"draft.num_anchors={NUM_ANCHORS}",
        "draft.block_decay=2.0"]))
    batch, aux_hidden = _micro_batch()
    whole = {"input_ids": batch.input_ids, "positions": batch.positions,
             "loss_mask": batch.loss_mask, "seq_lens": batch.seq_lens, "aux_hidden": aux_hidden}
    feats, bounds = chunk_features(whole, SpChunk(rank, world, halo=recipe.sp_halo))
    # Held-out micro-steps: a block at every valid position, several passes of NUM_ANCHORS.
    val_plan, _ = recipe.plan_batch(batch, StepKey(seed=0, step=-1, micro=0, shard=0))
    totals = block_label_counts(batch.loss_mask, SEQ_LENS,
                                padded_anchors(TRAIN_ANCHORS, NUM_ANCHORS), BLOCK)
    sp_model = make_draft(block_size=BLOCK, attention=attention)
    sp_model.use_sequence_parallel(dist.group.WORLD)
    report = {"rows": feats["input_ids"].shape[0], "chunk": bounds}
    for split, plan in (("train", {"anchors": TRAIN_ANCHORS}), ("val", val_plan)):
        meta = {**plan, "seq_lens": SEQ_LENS, **({"split": "val"} if split == "val" else {})}
        want, want_grads = _forward(recipe, make_draft(block_size=BLOCK, attention=attention),
                                    whole, meta, totals)  # every rank, alone
        chunk_meta = {**meta, "seq_lens": feats["seq_lens"].tolist(), "sp_chunk": bounds}
        have, have_grads = _forward(recipe, sp_model, feats, chunk_meta, totals)
        dist.all_reduce(have)
        for grad in have_grads.values():
            dist.all_reduce(grad)
        report[split] = {"have": {"stats": have.tolist(),
                                  **{n: g.tolist() for n, g in have_grads.items()}},
                         "want": {"stats": want.tolist(),
                                  **{n: g.tolist() for n, g in want_grads.items()}}}
    finish_rank(out, rank, report)


# The dense mask (loop) on 2 and 4 ranks; the flex BlockMask over the gathered context on 2.
@pytest.mark.parametrize("world,attention", [(2, "loop"), (4, "loop"), (2, "flex")])
def test_chunks_train_what_the_whole_micro_batch_trains(tmp_path, world, attention):
    size = -(-sum(SEQ_LENS) // world)
    for rank, got in enumerate(run_ranks(_worker, world, tmp_path, world, attention)):
        assert got["chunk"] == [rank * size, (rank + 1) * size]
        assert got["rows"] == size + BLOCK - 1  # the chunk and its halo
        for split in ("train", "val"):
            have, want = got[split]["have"], got[split]["want"]
            assert have.keys() == want.keys() and len(want) == (1 if split == "val" else 26)
            for key, value in want.items():
                a, b = (torch.tensor(v, dtype=torch.float64) for v in (have[key], value))
                # float32 sums in another order: an entry near zero carries the rounding of
                # its tensor's large ones (in float64 all agree to 1e-13).
                close = torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
                assert close, (split, key, a, b)
        # Not vacuous: labels counted, replies replayed, every weight trained.
        stats = torch.tensor(got["train"]["want"]["stats"])
        assert stats[7:10].sum() > 0 and stats[10] > 0 and got["val"]["want"]["stats"][-1] > 0
        assert all(torch.tensor(g).abs().sum() > 0
                   for k, g in got["train"]["want"].items() if k.startswith("grad."))


def test_dflash_needs_no_head_split_where_eagle3_does():
    from colocate.draft.eagle3_recipe import Eagle3Recipe

    target = qwen3_config()  # 4 attention heads, 2 key/value heads
    DFlashRecipe(load_config(None, ["draft.method=dflash", "train.sp_size=4"])
                 ).check_sequence_parallel(target)  # gathers keys/values, splits no heads
    with pytest.raises(ValueError, match=r"train.sp_size: 4 does not divide the draft's 4 "
                                         r"attention heads and 2 key/value heads"):
        Eagle3Recipe(load_config(None, ["train.sp_size=4"])).check_sequence_parallel(target)
