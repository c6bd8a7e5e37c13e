"""Exported drafts by kind: the one place that maps an export (its config.json
`architectures`) to how it is served.

Each `Served*` entry owns, for its kind of draft:
* `layer_ids(config)`: the target layers it reads (our convention: the OUTPUT of layer i);
* `num_steps(config, requested)`: draft tokens per verify step (Eagle3: eval.steps, a chain;
  DFlash: its block size - 1, fixed by training);
* `sglang_args(export, num_steps)`: sglang Engine arguments (ServerArgs) that serve it;
* `reference_draft(export, target_model, ...)`: the reference decoder's drafting object
  (`reset`, `extend(aux, next_tokens)`, `propose(num_steps)`).
Nothing else in eval branches on the kind of draft.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

from colocate.eval.exported import EvalError, ExportedDraft

if TYPE_CHECKING:
    from torch import nn


class ServedEagle3:
    """sglang EAGLE3 with topk 1: a chain of `num_steps` drafts, `num_steps + 1` verified."""

    architecture = "LlamaForCausalLMEagle3"
    layer_ids_key = "eagle_config.eagle_aux_hidden_state_layer_ids"

    def layer_ids(self, config: dict) -> list[int]:
        eagle = config.get("eagle_config") or {}
        return [int(i) for i in eagle.get("eagle_aux_hidden_state_layer_ids") or []]

    def num_steps(self, config: dict, requested: int) -> int:
        return requested

    def sglang_args(self, export: ExportedDraft, num_steps: int) -> dict:
        return {"speculative_algorithm": "EAGLE3",
                "speculative_draft_model_path": os.path.abspath(export.path),
                "speculative_num_steps": num_steps, "speculative_eagle_topk": 1,
                "speculative_num_draft_tokens": num_steps + 1}

    def reference_draft(self, export: ExportedDraft, target_model: "nn.Module", *,
                        dtype: torch.dtype, device: torch.device):
        from colocate.eval.exported import load_draft
        from colocate.eval.reference import IncrementalDraft

        model, d2t = load_draft(export, dtype=dtype, device=device)
        return IncrementalDraft(model, target_model.get_input_embeddings().weight, d2t)


class ServedDFlash:
    """sglang DFLASH: one block of `block_size` tokens per verify step (the bonus token and
    block_size - 1 drafts), drafted at once by the block draft."""

    architecture = "DFlashDraftModel"
    layer_ids_key = "dflash_config.target_layer_ids"

    def layer_ids(self, config: dict) -> list[int]:
        dflash = config.get("dflash_config") or {}
        return [int(i) for i in dflash.get("target_layer_ids") or []]

    def block_size(self, config: dict) -> int:
        """`parse_dflash_draft_config`'s lookup: dflash_config.block_size, then the top-level
        key, else sglang's default 16."""
        dflash = config.get("dflash_config") or {}
        return int(dflash.get("block_size", config.get("block_size")) or 16)

    def num_steps(self, config: dict, requested: int) -> int:
        num_steps = self.block_size(config) - 1
        if requested != num_steps:
            warnings.warn(f"eval.steps={requested} does not apply to a DFlash draft: it drafts "
                          f"its whole block, {num_steps} tokens per verify step (block_size "
                          f"{num_steps + 1} in its config.json)", stacklevel=2)
        return num_steps

    def sglang_args(self, export: ExportedDraft, num_steps: int) -> dict:
        # speculative_num_draft_tokens is the verify window, i.e. the block size; given
        # explicitly, so a config sglang fails to read cannot fall back to 16 silently.
        # num_steps and topk are forced to 1 by sglang's DFLASH hook anyway.
        return {"speculative_algorithm": "DFLASH",
                "speculative_draft_model_path": os.path.abspath(export.path),
                "speculative_num_draft_tokens": num_steps + 1,
                "speculative_num_steps": 1, "speculative_eagle_topk": 1}

    def reference_draft(self, export: ExportedDraft, target_model: "nn.Module", *,
                        dtype: torch.dtype, device: torch.device):
        from colocate.eval.block import BlockDraft
        from colocate.eval.exported import load_dflash

        model = load_dflash(export, dtype=dtype, device=device)
        return BlockDraft(model, target_model.get_input_embeddings().weight,
                          target_model.get_output_embeddings().weight)


SERVED = {m.architecture: m for m in (ServedEagle3(), ServedDFlash())}


def served_method(export: ExportedDraft):
    """The entry for the export's architecture; EvalError naming the file otherwise."""
    method = SERVED.get(export.architecture)
    if method is None:
        raise EvalError(f"{export.config_path}: architecture {export.architecture!r} has no "
                        f"sglang speculative algorithm here (known: {', '.join(SERVED)})")
    return method
