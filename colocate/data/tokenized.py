"""The tokenized dataset: every kept conversation as ids + loss mask, cached on disk.

Storage is three flat tensors (int32 ids, bool mask, int64 offsets into them) rather than
a list of tensors: one contiguous allocation, cheap to save, load and slice, however many
conversations there are. The cache key covers everything that changes the result (data
bytes, tokenizer files, template, max_length, flags, this module's format version), so a
stale entry can never be read; a changed input simply produces a new entry.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from colocate.config import DataSection, describe_path
from colocate.data.cache import (atomic_torch_save, load_cached, update_with_file,
                                 update_with_tokenizer_files)
from colocate.data.conversations import Conversation, read_conversations
from colocate.data.errors import MAX_LOGGED_SKIPS, DataError
from colocate.data.stats import DataStats
from colocate.data.encode import encode_conversation
from colocate.data.holdout import holdout_lines
from colocate.data.template import Renderer, check_generation_prompt, resolve_chat_template

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: conversations with roles out of order are malformed
"""Bump when tokenization or the stored layout changes, to invalidate old cache entries."""


@dataclass
class TokenizedDataset:
    ids: torch.Tensor
    """int32 [num_tokens]: all kept sequences back to back."""
    loss_mask: torch.Tensor
    """bool [num_tokens]: token t is assistant content (or its end-of-turn marker). Token
    t being True means the draft should learn to produce it; shifting is the trainer's."""
    offsets: torch.Tensor
    """int64 [num_sequences + 1]: sequence i is ids[offsets[i]:offsets[i + 1]]."""
    stats: DataStats
    """What happened to the input on the way here."""
    key: str
    """Content hash of every input; names the cache entry and keys derived caches."""
    cache_path: str = ""
    """Where the entry lives on disk ("" when not cached)."""
    from_cache: bool = False
    """True when loaded from an existing cache entry instead of tokenized now."""

    @property
    def num_sequences(self) -> int:
        return self.offsets.numel() - 1

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int32 [L], loss_mask bool [L]) of sequence ``i``; views, not copies."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end], self.loss_mask[start:end]

    def lengths(self) -> torch.Tensor:
        """int64 [num_sequences]: tokens per sequence."""
        return self.offsets[1:] - self.offsets[:-1]


def count_unmaskable(stats: DataStats, error: DataError) -> None:
    stats.skipped_unmaskable += 1
    if stats.skipped_unmaskable <= MAX_LOGGED_SKIPS:
        log.warning("skipping: %s", error)


def encode_sample(conversation: Conversation, renderer: Renderer, *, max_length: int,
                  last_assistant_turn_only: bool, stats: DataStats
                  ) -> tuple[list[int], list[bool]] | None:
    """One conversation as training sees it: ids and loss mask, cut at `max_length`; None
    when nothing in it is trainable. Counts into `stats` (kept, truncated, tokens, skips);
    a conversation whose replies cannot be masked is counted, logged (the first few) and
    re-raised as the DataError saying why. The one place a sample is encoded: the tokenized
    dataset and online decode (colocate/generate/online.py) both call it."""
    last_only = conversation.last_assistant_turn_only
    if last_only is None:
        last_only = last_assistant_turn_only
    try:
        encoded = encode_conversation(conversation, renderer, last_assistant_turn_only=last_only)
    except DataError as e:
        count_unmaskable(stats, e)
        raise
    stats.replies_own_ids += encoded.ids_used
    stats.replies_ids_unusable += encoded.ids_unusable
    seq_ids, seq_mask = encoded.ids[:max_length], encoded.mask[:max_length]
    num_trainable = sum(seq_mask)
    if num_trainable == 0:
        stats.skipped_no_trainable += 1
        return None
    stats.conversations += 1
    stats.truncated += int(len(encoded.ids) > max_length)
    stats.tokens += len(seq_ids)
    stats.trainable_tokens += num_trainable
    return seq_ids, seq_mask


def tokenize_file(path: str, renderer: Renderer, *, max_length: int,
                  last_assistant_turn_only: bool, skip_invalid: bool,
                  keep_line: Callable[[int], bool] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DataStats]:
    """Read, render, tokenize, mask and truncate every conversation of a JSONL file (the
    lines `keep_line` accepts; all by default).

    Returns (ids int32, loss_mask bool, offsets int64, stats). A conversation whose replies
    cannot be masked is counted and skipped (the first few logged with FILE:LINE). Raises
    DataError when nothing usable is left, since training on an empty stream can only hang
    later.
    """
    stats = DataStats()
    ids, mask = array.array("i"), array.array("b")  # compact, unlike lists of Python ints
    offsets = [0]
    checked, first_skip = False, ""
    for conversation in read_conversations(path, skip_invalid=skip_invalid, stats=stats,
                                           keep_line=keep_line):
        try:
            if not checked:
                check_generation_prompt(conversation, renderer)
                checked = True
            sample = encode_sample(conversation, renderer, max_length=max_length,
                                   last_assistant_turn_only=last_assistant_turn_only,
                                   stats=stats)
        except DataError as e:
            if not checked:  # the template could not render it: as unmaskable
                count_unmaskable(stats, e)
            first_skip = first_skip or str(e)
            continue
        if sample is not None:
            ids.extend(sample[0])
            mask.extend(sample[1])
            offsets.append(len(ids))
    if stats.conversations == 0:
        why = f"; the first skip: {first_skip}" if first_skip else ""
        raise DataError(f"{path}: no usable conversation ({stats.format()}); check the file "
                        f"and data.max_length{why}")
    # frombuffer shares the array's memory; clone so the tensors own theirs.
    return (torch.frombuffer(ids, dtype=torch.int32).clone(),
            torch.frombuffer(mask, dtype=torch.int8).to(torch.bool),
            torch.tensor(offsets, dtype=torch.int64), stats)


def tokenized_key(cfg: DataSection, template: str, tokenizer, tokenizer_path: str,
                  split: str = "train") -> str:
    """Hash of every input that changes the tokenized result."""
    h = hashlib.sha256()
    settings = {"format": FORMAT_VERSION, "max_length": cfg.max_length,
                "last_assistant_turn_only": cfg.last_assistant_turn_only,
                "skip_invalid": cfg.skip_invalid, "tokenizer_class": type(tokenizer).__name__,
                "template": template, "template_kwargs": cfg.chat_template_kwargs,
                "holdout": cfg.holdout, "split": split}
    h.update(json.dumps(settings, sort_keys=True).encode() + b"\0")
    update_with_file(h, cfg.path)
    h.update(b"\0tokenizer\0")
    update_with_tokenizer_files(h, tokenizer_path)
    return h.hexdigest()


def renderer_for(cfg: DataSection, tokenizer, tokenizer_path: str) -> Renderer:
    """The template `cfg` asks for, with its `chat_template_kwargs`, bound to `tokenizer`."""
    template = resolve_chat_template(cfg.chat_template, tokenizer, tokenizer_path)
    return Renderer(tokenizer, template, dict(cfg.chat_template_kwargs))


def load_or_build_tokenized(cfg: DataSection, tokenizer, tokenizer_path: str,
                            default_cache_dir: str, *, split: str = "train") -> TokenizedDataset:
    """The tokenized dataset for ``cfg``, from the cache when an entry for exactly these
    inputs exists, else tokenized now and cached (atomically) for the next process.

    split: "train" (every line but the `data.holdout` ones) or "holdout" (only those)."""
    assert split in ("train", "holdout"), split
    if not os.path.isfile(cfg.path):
        raise DataError(f"data.path: {describe_path(cfg.path)} is not a file; point it at a JSONL of "
                        "conversations")
    renderer = renderer_for(cfg, tokenizer, tokenizer_path)
    key = tokenized_key(cfg, renderer.template, tokenizer, tokenizer_path, split)
    cache_dir = cfg.cache_dir or default_cache_dir
    assert cache_dir, "pass default_cache_dir for when data.cache_dir is empty"
    cache_path = os.path.join(cache_dir, f"tokenized-{split}-{key[:24]}.pt")
    payload = load_cached(cache_path, key)
    if payload is not None:
        dataset = TokenizedDataset(payload["ids"], payload["loss_mask"], payload["offsets"],
                                   DataStats.from_dict(payload["stats"]), key, cache_path,
                                   from_cache=True)
        log.info("data: %s (cached in %s)", dataset.stats.format(), cache_path)
        return dataset
    held_out = holdout_lines(cfg.path, cfg.holdout)
    keep = held_out.__contains__ if split == "holdout" else lambda n: n not in held_out
    ids, loss_mask, offsets, stats = tokenize_file(
        cfg.path, renderer, max_length=cfg.max_length,
        last_assistant_turn_only=cfg.last_assistant_turn_only, skip_invalid=cfg.skip_invalid,
        keep_line=keep)
    atomic_torch_save({"key": key, "ids": ids, "loss_mask": loss_mask, "offsets": offsets,
                       "stats": stats.to_dict()}, cache_path)
    log.info("data: %s (cached to %s)", stats.format(), cache_path)
    return TokenizedDataset(ids, loss_mask, offsets, stats, key, cache_path)
