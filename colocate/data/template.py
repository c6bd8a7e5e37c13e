"""Chat template resolution, and token ids + loss mask for one conversation.

The loss mask must cover exactly what the assistant says, for *any* template, without
knowing its markup. So we let the template tell us where each reply lives:

    before_i  = render(messages[:i], add_generation_prompt=True)   # ends with the header
    through_i = render(messages[:i+1])                             # ends after turn i
    reply i   = full[len(before_i) : len(through_i)], trailing whitespace trimmed

The reply span then holds the content and the template's end-of-turn marker (the draft
must learn to stop) but not the role header. Character spans become token positions
through the fast tokenizer's offsets. This only works when the template renders
prefix-stably (a prefix of the conversation renders as a prefix of the whole); templates
that rewrite earlier turns (e.g. drop reasoning of old replies) are rejected with a clear
error rather than given a silently wrong mask.
"""

from __future__ import annotations

import logging
import os

from colocate.data.conversations import Conversation
from colocate.data.errors import DataError

log = logging.getLogger(__name__)


def resolve_chat_template(setting: str, tokenizer, tokenizer_path: str) -> str:
    """The Jinja source to use: ``data.chat_template`` (a file or inline), else the
    tokenizer's own."""
    if setting:
        if os.path.isfile(setting):
            with open(setting, encoding="utf-8") as f:
                return f.read()
        if "{{" in setting or "{%" in setting:
            return setting
        raise DataError(f"data.chat_template: {setting!r} is neither an existing file nor an "
                        "inline Jinja template (no '{{' or '{%'); fix the path or inline it")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one trains
        template = template.get("default")
    if not template:
        raise DataError(f"the tokenizer at {tokenizer_path} has no chat template; set "
                        "data.chat_template to a Jinja template (inline or a file path)")
    return template


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool,
            where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # Jinja errors, raise_exception() calls in the template
        raise DataError(f"{where}: the chat template failed to render the first "
                        f"{len(messages)} messages: {type(e).__name__}: {e}. Fix the "
                        "conversation or data.chat_template") from e
    assert isinstance(text, str), type(text)
    return text


def _not_prefix_stable(where: str, num_messages: int, prefix: str, full: str) -> DataError:
    at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b),
              min(len(prefix), len(full)))
    return DataError(
        f"{where}: the chat template is not prefix-stable: the first {num_messages} messages "
        f"render to text that is not a prefix of the whole conversation (they differ at "
        f"character {at}: {prefix[at:at + 40]!r} vs {full[at:at + 40]!r}). The loss mask is "
        "derived from rendered prefixes, so set data.chat_template to a template that "
        "renders each turn independently of later ones")


def assistant_char_spans(conversation: Conversation, tokenizer, template: str,
                         ) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text of the whole conversation and the [start, end) character span of each
    assistant reply, in order."""
    where = conversation.where
    messages = conversation.messages()
    full = _render(tokenizer, template, messages, False, where)
    spans = []
    for i, (role, _) in enumerate(conversation.turns):
        if role != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True, where)
        through = _render(tokenizer, template, messages[:i + 1], False, where)
        for n, prefix in ((i, before), (i + 1, through)):
            if not full.startswith(prefix):
                raise _not_prefix_stable(where, n, prefix, full)
        if not through.startswith(before):
            raise _not_prefix_stable(where, i, before, through)
        start, end = len(before), len(through)
        while end > start and full[end - 1].isspace():
            end -= 1  # the newline after an end-of-turn marker is the template's, not the reply's
        spans.append((start, end))
    return full, spans


def check_generation_prompt(conversation: Conversation, tokenizer, template: str) -> None:
    """Warn when the template ignores add_generation_prompt: the role header of each reply
    then lands inside the loss mask."""
    messages = conversation.messages()
    first = next(i for i, (r, _) in enumerate(conversation.turns) if r == "assistant")
    with_prompt = _render(tokenizer, template, messages[:first], True, conversation.where)
    without = _render(tokenizer, template, messages[:first], False, conversation.where)
    if with_prompt == without:
        log.warning("the chat template ignores add_generation_prompt, so assistant role "
                    "headers will be trained on; give data.chat_template one that supports it")


def tokenize_conversation(conversation: Conversation, tokenizer, template: str,
                          last_assistant_turn_only: bool) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trainable.

    A token is trainable when it overlaps a trainable reply span: a token that straddles
    the header/reply boundary (``"] 5"`` tokenized as ``"]"``, ``" 5"``) carries reply
    text, so the draft must learn it. Special tokens are not added again: the template
    already writes any BOS it wants.
    """
    text, spans = assistant_char_spans(conversation, tokenizer, template)
    if last_assistant_turn_only:
        spans = spans[-1:]
    spans = [span for span in spans if span[1] > span[0]]  # an empty reply has nothing to learn
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(f"{conversation.where}: the tokenizer cannot return offsets; the "
                        "data pipeline needs a fast (tokenizers-backed) tokenizer") from e
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [False] * len(ids)
    s = 0
    for t, (tok_start, tok_end) in enumerate(offsets):
        while s < len(spans) and tok_start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        mask[t] = max(tok_end, tok_start + 1) > spans[s][0]  # and tok_start < its end
    return list(ids), mask
