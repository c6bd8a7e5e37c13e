"""The prompts an evaluation decodes: held-out conversations up to their first reply, as the
target's token ids, and the token ids that end a reply."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

from colocate.config import Config, describe_path
from colocate.data import (Conversation, DataError, DataStats, Renderer, encode_prompt,
                           read_conversations)
from colocate.data.errors import MAX_LOGGED_SKIPS
from colocate.data.holdout import read_holdout_conversations
from colocate.eval.exported import EvalError

log = logging.getLogger(__name__)


def eval_conversations(cfg: Config) -> tuple[Iterable[Conversation], str]:
    """(conversations, where they come from): eval.data, else data.path's held-out split."""
    path = cfg.eval.data
    if path:
        if not os.path.isfile(path):
            raise EvalError(f"eval.data / --data {describe_path(path)}: no such file; give a JSONL of held-out "
                            "conversations")
        return read_conversations(path, skip_invalid=cfg.data.skip_invalid,
                                  stats=DataStats()), path
    if cfg.data.holdout <= 0:
        raise EvalError("no held-out prompts: data.holdout is 0; set --data or eval.data to a "
                        "JSONL of held-out conversations, or train with data.holdout > 0 so "
                        "eval can use the conversations training never saw")
    return read_holdout_conversations(cfg.data), f"{cfg.data.path} (data.holdout split)"


@dataclass
class EvalPrompts:
    prompts: list[list[int]]
    """Token ids of each prompt, in data order."""
    num_skipped_unrenderable: int = 0
    """Conversations whose prompt the chat template cannot render."""
    num_skipped_too_long: int = 0
    """Prompts that leave no room for eval.max_new_tokens in the target's context."""


def eval_prompts(conversations: Iterable[Conversation], renderer: Renderer, *, limit: int,
                 context_length: int, max_new_tokens: int, source: str) -> EvalPrompts:
    """The first `limit` usable prompts: per conversation the ids of its turns before the
    first assistant turn plus the generation prompt, exactly as training and `colocate
    generate` build them (`encode_prompt`), that leave room for max_new_tokens in the
    target's context. Conversations that open with the assistant have no prompt; ones the
    template cannot render and ones too long are counted (and the first few logged).
    """
    found = EvalPrompts([])
    room = context_length - max_new_tokens
    for conversation in conversations:
        first = conversation.assistant_turns[0]
        if first == 0:
            continue
        try:
            prompt = encode_prompt(conversation, renderer, first)
        except DataError as e:
            found.num_skipped_unrenderable += 1
            if found.num_skipped_unrenderable <= MAX_LOGGED_SKIPS:
                log.warning("eval: skipping a prompt the chat template cannot render: %s", e)
            continue
        if len(prompt) > room:
            found.num_skipped_too_long += 1
            continue
        found.prompts.append(prompt)
        if len(found.prompts) == limit:
            break
    if not found.prompts:
        raise EvalError(_no_prompt_message(found, source, context_length, max_new_tokens))
    return found


def _no_prompt_message(found: EvalPrompts, source: str, context_length: int,
                       max_new_tokens: int) -> str:
    unrenderable = (f"; {found.num_skipped_unrenderable} the chat template cannot render "
                    "(the log shows why)" if found.num_skipped_unrenderable else "")
    if found.num_skipped_too_long:
        return (f"{source}: all {found.num_skipped_too_long} prompts are longer than the "
                f"target's context ({context_length}) minus eval.max_new_tokens "
                f"({max_new_tokens}){unrenderable}; lower eval.max_new_tokens or use shorter "
                "prompts")
    if found.num_skipped_unrenderable:
        return (f"{source}: no usable prompt: all {found.num_skipped_unrenderable} the chat "
                "template cannot render (the log shows why); fix data.chat_template or the data")
    return (f"{source}: no usable prompt (no conversation has a turn before its first "
            "assistant turn); give conversations that start with a user turn")
