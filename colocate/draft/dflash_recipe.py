"""DFlash as a recipe: block drafting with a multi-layer draft conditioned on target layers.

Reads K target layers (sglang's default spread, K = 5) and no final hidden state: the labels
are the trained tokens themselves. Per micro-batch the engine draws the anchors (block
starts) from (seed, step, micro-step, data shard) and ships them in the message's meta, so
the step's loss denominator is known before the first backward, and a resumed run and the
engines of a sequence-parallel group draw the same blocks. Served by sglang's DFLASH
(`DFlashDraftModel`). The model, blocks, loss and export live in colocate/draft/dflash.py,
dflash_blocks.py, dflash_loss.py and colocate/export_dflash.py.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from colocate import metrics
from colocate.draft.dflash import DFlashArch, DFlashDraft, default_target_layer_ids
from colocate.draft.dflash_blocks import block_label_counts, draw_anchors, position_weights
from colocate.draft.attention import seq_bounds_from_lens
from colocate.draft.dflash_loss import dflash_forward
from colocate.draft.loss import seq_end_per_token
from colocate.draft.recipe import DraftRecipe, DraftStepResult, FrozenTarget, StepKey
from colocate.sequence_parallel import summarize_whole

NUM_CONTEXT_LAYERS = 5
"""Target layers DFlash reads by default (sglang's and the paper's choice)."""


def resolve_mask_token_id(configured: int, target_path: str, vocab_size: int) -> int:
    """draft.mask_token_id, or (-1) the tokenizer's mask token, else its pad token, else the
    last id of the target vocabulary. Any fixed id works (its frozen embedding only marks
    "unknown"), but trainer and export must agree: both resolve it here."""
    if configured >= 0:
        return configured
    from colocate.target import load_tokenizer

    tokenizer = load_tokenizer(target_path)
    for candidate in (getattr(tokenizer, "mask_token_id", None),
                      getattr(tokenizer, "pad_token_id", None)):
        if candidate is not None and 0 <= candidate < vocab_size:
            return int(candidate)
    return vocab_size - 1


def padded_anchors(rows: list[list[int]], num_anchors: int,
                   num_sequences: int | None = None) -> torch.Tensor:
    """[S, num_anchors] int64, -1 padded, from the meta's per-sequence valid anchors;
    num_sequences: S when more than the rows (a sequence-parallel chunk's seq_lens end
    with a padding sequence, which has no anchors)."""
    num_sequences = len(rows) if num_sequences is None else num_sequences
    out = torch.full((num_sequences, num_anchors), -1, dtype=torch.long)
    for s, row in enumerate(rows):
        out[s, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class DFlashRecipe(DraftRecipe):
    method = "dflash"
    needs_last_hidden = False
    served_algorithm = "DFLASH"

    def default_layer_ids(self, num_layers: int) -> list[int]:
        return default_target_layer_ids(num_layers, NUM_CONTEXT_LAYERS)

    @property
    def num_positions(self) -> int:
        return self.cfg.draft.block_size - 1

    def plan_batch(self, batch, key: StepKey) -> tuple[dict, torch.Tensor]:
        d = self.cfg.draft
        # Held-out micro-steps (step -1): a block at every valid position, so validation
        # replays serving exactly (see `forward`); training samples d.num_anchors of them.
        num = d.num_anchors if key.step >= 0 else max(int(n) for n in batch.seq_lens)
        anchors = draw_anchors(batch.loss_mask, batch.seq_lens, num, key.generator())
        counts = block_label_counts(batch.loss_mask, batch.seq_lens, anchors, d.block_size)
        # Only the valid anchors travel (the padding is rebuilt on the trainer): a few KB.
        rows = [[a for a in row if a >= 0] for row in anchors.tolist()]
        return {"anchors": rows}, counts

    init_keys = {"hidden_size": "target.path", "num_attention_heads": "target.path",
                 "num_key_value_heads": "target.path", "head_dim": "target.path",
                 "intermediate_size": "draft.intermediate_size", "vocab_size": "target.path",
                 "num_hidden_layers": "draft.num_layers", "block_size": "draft.block_size",
                 "dflash_config.target_layer_ids": "target.aux_layer_ids",
                 "dflash_config.mask_token_id": "draft.mask_token_id"}

    def arch(self, target_config, layer_ids: list[int]) -> DFlashArch:
        mask_id = resolve_mask_token_id(self.cfg.draft.mask_token_id, self.cfg.target.path,
                                        target_config.vocab_size)
        return DFlashArch.from_target_config(target_config, self.cfg.draft, layer_ids, mask_id)

    def build_model(self, target_config, draft_vocab_size: int,
                    layer_ids: list[int]) -> tuple[DFlashArch, DFlashDraft]:
        del draft_vocab_size  # DFlash drafts over the target's whole vocabulary (its lm_head)
        arch = self.arch(target_config, layer_ids)
        model = DFlashDraft(arch, attention=self.cfg.draft.attention,
                            kernels=self.cfg.draft.kernels)
        model.init_weights(torch.Generator().manual_seed(self.cfg.run.seed))
        return arch, model

    def shard(self, model: DFlashDraft, mesh, mp_policy) -> None:
        # One unit per layer, fc/hidden_norm/norm with the root; kept unsharded between
        # forwards like Eagle3's (small draft, one forward per micro-step).
        for unit in model.layers:
            fully_shard(unit, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)

    def forward(self, model: DFlashDraft, frozen: FrozenTarget, feats: dict[str, torch.Tensor],
                meta: dict, *, label_totals: torch.Tensor | None = None, timer=None):
        del timer  # no teacher phase: the labels are the tokens
        d = self.cfg.draft
        if meta.get("split") == "val":
            return self._replay(model, frozen, feats, meta)
        seq_lens = meta["seq_lens"]
        anchors = padded_anchors(meta["anchors"], d.num_anchors, len(seq_lens))
        return dflash_forward(model, frozen.embed, frozen.lm_head, feats["aux_hidden"],
                              feats["input_ids"], feats["loss_mask"], feats["positions"],
                              seq_lens, anchors, gamma=d.block_decay,
                              label_totals=label_totals, sp_chunk=meta.get("sp_chunk"))

    @property
    def sp_halo(self) -> int:
        # A block anchored at the chunk's last row reads the ids and loss mask of the
        # block_size - 1 rows after it (its labels); the anchors need no more (drawn whole).
        return self.cfg.draft.block_size - 1

    @torch.no_grad()
    def _replay(self, model: DFlashDraft, frozen: FrozenTarget, feats: dict, meta: dict):
        """Validation: blocks at every valid position (plan_batch), draft.num_anchors per
        forward (training's shapes), then serving replayed exactly: each reply's verify
        cycles start where the last one stopped, as sglang's DFLASH decodes the target's
        own answers. (Training's sim_accept_length averages randomly drawn blocks instead,
        which overstates what is served.) The other statistics sum over every block.

        With sequence parallelism every trainer of the group runs the same passes (the
        anchors are the whole micro-batch's; each trains those in its chunk) and the
        replay walks the whole micro-batch, counted once per group."""
        d = self.cfg.draft
        rows, seq_lens = meta["anchors"], meta["seq_lens"]
        accepted_T = torch.zeros_like(feats["input_ids"], dtype=torch.long)
        parts = []
        for start in range(0, max([len(row) for row in rows] + [1]), d.num_anchors):
            anchors = padded_anchors([row[start:start + d.num_anchors] for row in rows],
                                     d.num_anchors, len(seq_lens))
            parts.append(dflash_forward(
                model, frozen.embed, frozen.lm_head, feats["aux_hidden"], feats["input_ids"],
                feats["loss_mask"], feats["positions"], seq_lens, anchors,
                gamma=d.block_decay, accepted_T=accepted_T, sp_chunk=meta.get("sp_chunk")))
        seq_end_T = seq_end_per_token(seq_bounds_from_lens(seq_lens), accepted_T.device)
        num_rows = feats["positions"].shape[0]  # the chunk's: ids and mask carry a halo
        sim = summarize_whole(
            lambda accepted, mask: metrics.replay_serving(accepted, mask, seq_end_T),
            [accepted_T[:num_rows], feats["loss_mask"][:num_rows]], model.sp_group)
        return DraftStepResult(
            loss=sum(p.loss for p in parts), ce_sum=sum(p.ce_sum for p in parts),
            hits=sum(p.hits for p in parts), counted=sum(p.counted for p in parts), sim=sim)

    def train_flops_per_token(self, geom, seq_len: int, num_layers: int) -> float:
        d = self.cfg.draft
        return metrics.dflash_train_flops_per_token(
            geom, seq_len, num_layers=d.num_layers, block_size=d.block_size,
            num_anchors=d.num_anchors, num_context=num_layers,
            intermediate_size=d.intermediate_size)

    def summary(self, values) -> dict[str, float]:
        d = self.cfg.draft
        return metrics.step_summary(values, pooled_weights=position_weights(
            d.block_size, d.block_decay).tolist())

    def export(self, state_dict, arch: DFlashArch, *, vocab: dict, layer_ids: list[int],
               target_config, out_dir: str) -> str:
        del vocab, layer_ids  # the arch holds the layer ids; no reduced vocabulary
        from colocate.export_dflash import export_dflash

        return export_dflash(state_dict, arch, target_config=target_config, out_dir=out_dir)

    def export_config(self, target_config, draft_vocab_size: int,
                      layer_ids: list[int]) -> dict:
        del draft_vocab_size
        from colocate.export_dflash import dflash_config

        return dflash_config(self.arch(target_config, layer_ids), target_config)
