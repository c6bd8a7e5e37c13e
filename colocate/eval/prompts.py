"""The prompts an evaluation decodes: held-out conversations up to their first reply, as the
target's token ids, and the token ids that end a reply."""

from __future__ import annotations

import os
from typing import Iterable

from colocate.config import Config
from colocate.data import (Conversation, DataError, DataStats, Renderer, encode_prompt,
                           read_conversations)
from colocate.data.holdout import read_holdout_conversations
from colocate.eval.exported import EvalError


def eval_conversations(cfg: Config) -> tuple[Iterable[Conversation], str]:
    """(conversations, where they come from): eval.data, else data.path's held-out split."""
    path = cfg.eval.data
    if path:
        if not os.path.isfile(path):
            raise EvalError(f"eval.data / --data {path}: no such file; give a JSONL of held-out "
                            "conversations")
        return read_conversations(path, skip_invalid=cfg.data.skip_invalid,
                                  stats=DataStats()), path
    if cfg.data.holdout <= 0:
        raise EvalError("no held-out prompts: data.holdout is 0; set --data or eval.data to a "
                        "JSONL of held-out conversations, or train with data.holdout > 0 so "
                        "eval can use the conversations training never saw")
    return read_holdout_conversations(cfg.data), f"{cfg.data.path} (data.holdout split)"


def eval_prompts(conversations: Iterable[Conversation], renderer: Renderer,
                 limit: int) -> list[list[int]]:
    """One prompt per conversation: the ids of its turns before the first assistant turn plus
    the generation prompt, exactly as training and `colocate generate` build them
    (`encode_prompt`). Conversations that open with the assistant, or whose prompt the
    template cannot render, give none. At most `limit`.
    """
    prompts = []
    for conversation in conversations:
        first = conversation.assistant_turns[0]
        if first == 0:
            continue
        try:
            prompts.append(encode_prompt(conversation, renderer, first))
        except DataError:
            continue
        if len(prompts) == limit:
            break
    return prompts


def fit_context(prompts: list[list[int]], context_length: int, max_new_tokens: int,
                source: str) -> tuple[list[list[int]], int]:
    """(prompts that leave room for max_new_tokens in the target's context, number dropped)."""
    if not prompts:
        raise EvalError(f"{source}: no usable prompt (no conversation has a turn before its "
                        "first assistant turn); give conversations that start with a user turn")
    room = context_length - max_new_tokens
    kept = [p for p in prompts if len(p) <= room]
    if not kept:
        raise EvalError(f"{source}: all {len(prompts)} prompts are longer than the target's "
                        f"context ({context_length}) minus eval.max_new_tokens "
                        f"({max_new_tokens}); lower eval.max_new_tokens or use shorter prompts")
    return kept, len(prompts) - len(kept)
