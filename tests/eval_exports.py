"""Randomly initialised drafts (Eagle3, DFlash) exported for a target: what eval tests decode with."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.export import export_draft


def write_random_export(target_path: str, out_dir: str, *, aux_layer_ids=(1, 2, 3),
                        draft_vocab_size: int = 512, seed: int = 0) -> str:
    """Export an `init_weights` draft over a random sorted draft vocabulary; returns out_dir."""
    target_config = AutoConfig.from_pretrained(target_path, local_files_only=True)
    vocab = target_config.vocab_size
    arch = DraftArch.from_target_config(
        target_config, DraftSection(draft_vocab_size=draft_vocab_size), len(aux_layer_ids))
    model = Eagle3Draft(arch)
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator)
    draft_ids = torch.randperm(vocab, generator=generator)[:draft_vocab_size].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    return export_draft(model.state_dict(), arch, d2t=draft_ids - torch.arange(draft_vocab_size),
                        t2d=t2d, aux_layer_ids=list(aux_layer_ids), target_config=target_config,
                        out_dir=out_dir)


def write_random_dflash_export(target_path: str, out_dir: str, *, target_layer_ids=(1, 2, 4),
                               num_layers: int = 2, block_size: int = 8, seed: int = 0,
                               std: float = 0.02) -> str:
    """Export an `init_weights` DFlash draft for the target (mask token: its last id)."""
    from colocate.draft.dflash import DFlashArch, DFlashDraft
    from colocate.export_dflash import export_dflash

    target_config = AutoConfig.from_pretrained(target_path, local_files_only=True)
    section = DraftSection(num_layers=num_layers, block_size=block_size)
    arch = DFlashArch.from_target_config(target_config, section, list(target_layer_ids),
                                         target_config.vocab_size - 1)
    model = DFlashDraft(arch)
    model.init_weights(torch.Generator().manual_seed(seed), std=std)
    return export_dflash(model.state_dict(), arch, target_config=target_config, out_dir=out_dir)
