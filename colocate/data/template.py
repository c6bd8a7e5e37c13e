"""Chat templates: which template, rendering, and where each assistant reply lives.

The loss mask must cover exactly what the assistant says, for *any* template, without
knowing its markup. So we let the template tell us where each reply lives:

    before_i  = render(messages[:i], add_generation_prompt=True)   # ends with the header
    through_i = render(messages[:i+1])                             # ends after turn i
    reply i   = full[len(before_i) : len(through_i)], trailing whitespace trimmed

The reply span then holds the content and the template's end-of-turn marker (the draft
must learn to stop) but not the role header. That needs the template to be prefix-stable,
and many are not:

* Qwen3 renders an (empty) think block into the LAST assistant reply only, so `through_i`
  of an earlier reply is not a prefix of the whole conversation. Then the reply ends at
  the first end-of-turn marker after its start (the marker is what the template writes
  after any reply: the common suffix of two renders with different contents).
* With `enable_thinking: false` Qwen3's generation prompt carries the empty think block,
  so `before_i` is not a prefix either. Then the reply starts after the header the
  template writes before a probe reply in the same place (followed by a user turn, as
  the real reply is).
* DeepSeek-R1 drops the reasoning of every reply from history; the spans still hold what
  the template renders.

Each located reply is checked to contain its visible content (the text after any
`</think>`); a reply that cannot be located is a `DataError` naming FILE:LINE, which the
dataset build counts and skips. Character spans become token positions in
`colocate.data.encode`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from colocate.data.conversations import Conversation
from colocate.data.errors import DataError

log = logging.getLogger(__name__)

# Two contents that differ only at their end: what their renders share at the end is the
# template's end-of-turn marker.
_PROBE_CONTENTS = ("colocate probe reply a", "colocate probe reply b")


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


@dataclass(frozen=True)
class Renderer:
    """A tokenizer, the resolved template and `data.chat_template_kwargs`: everything that
    decides how messages become text."""

    tokenizer: Any
    template: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=generation_prompt, **self.kwargs)
        except Exception as e:  # Jinja errors, raise_exception() calls in the template
            raise DataError(f"{where}: the chat template failed to render the first "
                            f"{len(messages)} messages: {type(e).__name__}: {e}. Fix the "
                            "conversation or data.chat_template") from e
        assert isinstance(text, str), type(text)
        return text


@dataclass(frozen=True)
class ReplySpan:
    turn: int
    """Index of the assistant turn in the conversation."""
    start: int
    """First character of the reply in the rendered text (after the role header)."""
    end: int
    """One past its end-of-turn marker."""


def _unlocatable(where: str, turn: int, why: str) -> DataError:
    return DataError(f"{where}: cannot locate assistant turn {turn} in the rendered "
                     f"conversation: {why}. The sample is skipped; set data.chat_template to "
                     "a template that renders each reply as the model writes it")


def _reply_start(renderer: Renderer, messages: list[dict], i: int, text: str,
                 where: str) -> int:
    before = renderer.render(messages[:i], True, where)
    if text.startswith(before):
        return len(before)
    prior = renderer.render(messages[:i], False, where)
    if not text.startswith(prior):
        raise _unlocatable(where, i, "the turns before it render differently once later turns "
                                     "follow (the template rewrites earlier turns)")
    # The generation prompt differs from what the template writes before a reply that
    # later turns follow (Qwen3 without thinking puts an empty think block in the prompt
    # only): take that header from a probe reply in the same place.
    probe = renderer.render(messages[:i] + [{"role": "assistant", "content": _PROBE_CONTENTS[0]},
                                            {"role": "user", "content": _PROBE_CONTENTS[1]}],
                            False, where)
    found = probe.find(_PROBE_CONTENTS[0], len(prior))
    header = probe[len(prior):found] if probe.startswith(prior) and found >= 0 else None
    if header is None or not text.startswith(header, len(prior)):
        raise _unlocatable(where, i, "the template writes a header before it that neither its "
                                     "generation prompt nor a probe reply shows")
    return len(prior) + len(header)


def _end_marker(renderer: Renderer, messages: list[dict], i: int, where: str) -> str:
    """What the template writes after a reply (e.g. "<|im_end|>"), found by rendering the
    turns before `i` plus two probe replies and keeping their common ending."""
    a, b = (renderer.render(messages[:i] + [{"role": "assistant", "content": c}], False, where)
            for c in _PROBE_CONTENTS)
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1].strip()


def _visible_content(message: dict) -> str:
    """The part of a reply any template shows: the text after a `</think>`, stripped."""
    return message["content"].split("</think>")[-1].strip()


def locate_replies(renderer: Renderer, conversation: Conversation, *,
                   num_turns: int | None = None, generation_prompt: bool = False,
                   ) -> tuple[str, list[ReplySpan]]:
    """The rendered text of the first `num_turns` turns (all by default; with the generation
    prompt when asked) and the span of every assistant reply in it, in order."""
    where = conversation.where
    messages = conversation.messages(num_turns)
    text = renderer.render(messages, generation_prompt, where)
    spans, marker = [], None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _reply_start(renderer, messages, i, text, where)
        through = renderer.render(messages[:i + 1], False, where)
        if text.startswith(through) and len(through) >= start:
            end = len(through)
        else:  # rendered differently when later turns follow: end at its end-of-turn marker
            if marker is None:
                marker = _end_marker(renderer, messages, i, where)
            found = text.find(marker, start) if marker else -1
            if found < 0:
                raise _unlocatable(where, i, "the template writes no end-of-turn marker to "
                                             "find it by")
            end = found + len(marker)
        while end > start and text[end - 1].isspace():
            end -= 1  # the newline after an end-of-turn marker is the template's, not the reply's
        if _visible_content(message) not in text[start:end]:
            raise _unlocatable(where, i, f"its content is not inside the located span "
                                         f"{text[start:end][:60]!r}")
        spans.append(ReplySpan(i, start, end))
    return text, spans


def check_generation_prompt(conversation: Conversation, renderer: Renderer) -> None:
    """Warn when the template ignores add_generation_prompt: the role header of each reply
    then lands inside the loss mask."""
    messages = conversation.messages(conversation.assistant_turns[0])
    where = conversation.where
    if renderer.render(messages, True, where) == renderer.render(messages, False, where):
        log.warning("the chat template ignores add_generation_prompt, so assistant role "
                    "headers will be trained on; give data.chat_template one that supports it")
