"""Eagle3 as a recipe: chain drafting with a one-layer draft, trained by test-time unrolling.

Reads three target layers ([1, L//2-1, L-4] by default) and the final norm's output (the
teacher: the target's own next-token distribution over the draft vocabulary); served by
sglang's EAGLE3 (`LlamaForCausalLMEagle3`). The model, loss and export live in
colocate/draft/eagle3.py, colocate/draft/loss.py and colocate/export.py.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from colocate import metrics
from colocate.draft.arch import DraftArch
from colocate.draft.eagle3 import Eagle3Draft
from colocate.draft.attention import seq_bounds_from_lens
from colocate.draft.loss import eagle3_unroll, label_counts, label_rows
from colocate.draft.recipe import DraftRecipe, FrozenTarget, StepKey
from colocate.draft.teacher import teacher_for
from colocate.sequence_parallel import check_heads


def eagle3_layer_ids(num_layers: int) -> list[int]:
    """Eagle3's choice: outputs of a low, a middle and a late layer, [1, L//2 - 1, L - 4]."""
    if num_layers < 4:
        raise ValueError(
            f"target.aux_layer_ids: the target has only {num_layers} decoder layers, too few for "
            f"Eagle3's default [1, L//2-1, L-4]; set target.aux_layer_ids explicitly to ids in "
            f"[0, {max(num_layers - 2, 0)}]")
    return [1, num_layers // 2 - 1, num_layers - 4]


class Eagle3Recipe(DraftRecipe):
    method = "eagle3"
    needs_last_hidden = True
    served_algorithm = "EAGLE3"

    def default_layer_ids(self, num_layers: int) -> list[int]:
        return eagle3_layer_ids(num_layers)

    @property
    def num_positions(self) -> int:
        return self.cfg.draft.unroll_steps

    def plan_batch(self, batch, key: StepKey) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        del key  # nothing random: every position is scored
        return {}, label_counts(batch.seq_lens, batch.loss_mask, self.cfg.draft.unroll_steps)

    init_keys = {"hidden_size": "target.path", "num_attention_heads": "target.path",
                 "num_key_value_heads": "target.path", "head_dim": "target.path",
                 "intermediate_size": "draft.intermediate_size", "vocab_size": "target.path",
                 "num_hidden_layers": "draft.method (an Eagle3 draft has one layer)",
                 "draft_vocab_size": "draft.draft_vocab_size",
                 "eagle_config.eagle_aux_hidden_state_layer_ids": "target.aux_layer_ids"}
    vocab_maps = ("d2t", "t2d")
    _teacher: tuple = (None, None)  # (the FrozenTarget bound, its teacher): bind_frozen

    def arch(self, target_config, draft_vocab_size: int, layer_ids: list[int]) -> DraftArch:
        import dataclasses

        section = dataclasses.replace(self.cfg.draft, draft_vocab_size=draft_vocab_size)
        return DraftArch.from_target_config(target_config, section, len(layer_ids))

    def build_model(self, target_config, draft_vocab_size: int,
                    layer_ids: list[int]) -> tuple[DraftArch, Eagle3Draft]:
        arch = self.arch(target_config, draft_vocab_size, layer_ids)
        model = Eagle3Draft(arch, attention=self.cfg.draft.attention,
                            kernels=self.cfg.draft.kernels)
        model.init_weights(torch.Generator().manual_seed(self.cfg.run.seed))
        return arch, model

    def shard(self, model: Eagle3Draft, mesh, mp_policy) -> None:
        # The draft is small and every micro-step runs it unroll_steps times: keep it
        # unsharded between forwards instead of all-gathering it on every step.
        fully_shard(model.midlayer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)

    def bind_frozen(self, frozen: FrozenTarget) -> None:
        # draft.teacher_argmax=fp8 stores the head's non-draft rows in FP8 once, here.
        self._teacher = (frozen, teacher_for(self.cfg.draft.teacher_argmax, frozen.lm_head,
                                             frozen.draft_ids))

    def forward(self, model: Eagle3Draft, frozen: FrozenTarget, feats: dict[str, torch.Tensor],
                meta: dict, *, label_totals: torch.Tensor | None = None, timer=None):
        if self._teacher[0] is not frozen:  # a caller that never bound it (tests, profiles)
            self.bind_frozen(frozen)
        d = self.cfg.draft
        offset = meta.get("sp_chunk", (0,))[0]
        rows = label_rows(feats["loss_mask"], seq_bounds_from_lens(meta["seq_lens"]),
                          d.unroll_steps, feats["positions"].shape[0], offset)
        with torch.no_grad():  # only the rows a label needs (loss.py's docstring)
            target = self._teacher[1](feats["last_hidden"][rows.teacher])
        if timer:
            timer.mark("teacher")
        return eagle3_unroll(model, frozen.embed, feats["aux_hidden"], target,
                             feats["input_ids"], feats["loss_mask"], feats["positions"],
                             meta["seq_lens"], d.unroll_steps, d.position_decay,
                             label_totals=label_totals, offset=offset, rows=rows)

    @property
    def sp_halo(self) -> int:
        # Step k at index t reads the token and teacher row t + 1 + k and the mask at t + 2 + k.
        return self.cfg.draft.unroll_steps + 1

    def check_sequence_parallel(self, target_config) -> None:
        # Ulysses gives each trainer a share of the draft's heads, which are the target's.
        heads = target_config.num_attention_heads
        check_heads(heads, getattr(target_config, "num_key_value_heads", None) or heads,
                    self.cfg.train.sp_size)

    def train_flops_per_token(self, geom, seq_len: int, num_layers: int) -> float:
        d = self.cfg.draft
        return metrics.draft_train_flops_per_token(
            geom, seq_len, draft_vocab_size=min(d.draft_vocab_size, geom.vocab_size),
            unroll_steps=d.unroll_steps, num_aux=num_layers, intermediate_size=d.intermediate_size)

    def summary(self, values) -> dict[str, float]:
        return metrics.step_summary(values, self.cfg.draft.position_decay)

    def export(self, state_dict, arch: DraftArch, *, vocab: dict, layer_ids: list[int],
               target_config, out_dir: str) -> str:
        from colocate.export import export_draft

        return export_draft(state_dict, arch, d2t=vocab["d2t"], t2d=vocab["t2d"],
                            aux_layer_ids=layer_ids, target_config=target_config,
                            out_dir=out_dir)

    def export_config(self, target_config, draft_vocab_size: int,
                      layer_ids: list[int]) -> dict:
        from colocate.export import draft_config

        vocab = min(draft_vocab_size, target_config.vocab_size)  # clamped, as the data's is
        return draft_config(self.arch(target_config, vocab, layer_ids), layer_ids, target_config)
