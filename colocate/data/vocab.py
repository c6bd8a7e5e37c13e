"""The draft's reduced vocabulary, chosen from what the draft will actually be asked to
produce: loss-masked token frequencies over the whole tokenized dataset.

Mappings follow EAGLE3/sglang: ``d2t[d]`` is an offset, ``target_id = d + d2t[d]``;
``t2d[t]`` says whether target token t is in the draft vocabulary. Draft ids are sorted
ascending, so the draft's lm_head rows keep target order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from colocate.data.cache import atomic_torch_save, load_cached
from colocate.data.errors import DataError
from colocate.data.tokenized import TokenizedDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftVocab:
    d2t: torch.Tensor
    """int64 [draft_vocab]: target_id = draft_id + d2t[draft_id]."""
    t2d: torch.Tensor
    """bool [target_vocab]: True where the target token is in the draft vocabulary."""
    draft_ids: torch.Tensor
    """int64 [draft_vocab]: the target ids of the draft vocabulary, ascending."""

    @property
    def size(self) -> int:
        return self.draft_ids.numel()


def select_draft_ids(ids: torch.Tensor, loss_mask: torch.Tensor, draft_vocab_size: int,
                     target_vocab_size: int) -> torch.Tensor:
    """Top ``draft_vocab_size`` target ids by loss-masked frequency, ascending.

    Ties go to the lower id. With fewer distinct trainable tokens than the size, the rest
    are filled with the ids most frequent over all tokens (prompts included; then lower id
    first), so the size is exact and the fill is at least plausible text.
    """
    assert draft_vocab_size <= target_vocab_size
    ids = ids.to(torch.int64)
    if ids.numel() and int(ids.max()) >= target_vocab_size:
        raise DataError(f"the data holds token id {int(ids.max())} but the target vocabulary "
                        f"has {target_vocab_size} entries; the tokenizer does not match "
                        "target.path")
    masked = torch.bincount(ids[loss_mask], minlength=target_vocab_size)
    overall = torch.bincount(ids, minlength=target_vocab_size)
    # Stable descending sorts keep equal counts in id order: that is the tie-break.
    by_masked = torch.sort(masked, descending=True, stable=True).indices
    chosen = by_masked[masked[by_masked] > 0][:draft_vocab_size]
    if chosen.numel() < draft_vocab_size:
        rest = torch.ones(target_vocab_size, dtype=torch.bool)
        rest[chosen] = False
        rest_ids = rest.nonzero().squeeze(1)
        fill = rest_ids[torch.sort(overall[rest_ids], descending=True, stable=True).indices]
        chosen = torch.cat([chosen, fill[:draft_vocab_size - chosen.numel()]])
    return torch.sort(chosen).values


def make_draft_vocab(draft_ids: torch.Tensor, target_vocab_size: int) -> DraftVocab:
    """d2t / t2d for ascending target ids ``draft_ids``."""
    draft_ids = draft_ids.to(torch.int64)
    d2t = draft_ids - torch.arange(draft_ids.numel(), dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return DraftVocab(d2t=d2t, t2d=t2d, draft_ids=draft_ids)


def load_or_build_vocab(tokenized: TokenizedDataset, draft_vocab_size: int,
                        target_vocab_size: int, cache_dir: str) -> DraftVocab:
    """The draft vocabulary for this dataset, cached beside it (keyed by the tokenized
    data's key and both sizes)."""
    if draft_vocab_size > target_vocab_size:
        log.warning("draft.draft_vocab_size=%d exceeds the target vocabulary (%d); using %d",
                    draft_vocab_size, target_vocab_size, target_vocab_size)
        draft_vocab_size = target_vocab_size
    key = f"{tokenized.key}:{draft_vocab_size}:{target_vocab_size}"
    path = os.path.join(cache_dir,
                        f"vocab-{tokenized.key[:24]}-{draft_vocab_size}-{target_vocab_size}.pt")
    payload = load_cached(path, key)
    if payload is not None:
        return make_draft_vocab(payload["draft_ids"], target_vocab_size)
    draft_ids = select_draft_ids(tokenized.ids, tokenized.loss_mask, draft_vocab_size,
                                 target_vocab_size)
    atomic_torch_save({"key": key, "draft_ids": draft_ids}, path)
    vocab = make_draft_vocab(draft_ids, target_vocab_size)
    trainable = tokenized.ids[tokenized.loss_mask].to(torch.int64)
    coverage = vocab.t2d[trainable].float().mean().item() if trainable.numel() else 0.0
    log.info("draft vocabulary: %d of %d target tokens, covering %.1f%% of trainable tokens",
             draft_vocab_size, target_vocab_size, 100.0 * coverage)
    return vocab
