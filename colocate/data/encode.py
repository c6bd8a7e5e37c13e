"""Token ids and loss masks of conversations, and the prompts the target answers.

One function builds both, so the prompt the target saw when `colocate generate` produced
reply i is exactly the context training gives reply i, wherever the template renders a
conversation's history as it rendered the prompt (a template that changes earlier turns
once later ones follow, e.g. Qwen3 without thinking, whose generation prompt holds an empty
think block that history does not, trains such a reply after its history's header):

* Text is tokenized from the rendered template (special tokens are not added again: the
  template already writes any BOS it wants).
* An assistant reply that carries the target's own `token_ids` is spliced in as those ids
  instead of re-tokenizing its text, wherever the template renders that reply as the ids
  decode (plus, at most, an end-of-turn marker the ids lack, e.g. after a length cut).
  Decoded text does not always tokenize back to the ids the target emitted (the tiny
  target's "72 72 72" re-tokenizes as "7", "27", "27", ...), and a draft trained on the
  re-tokenized text learns what the target never says. The text around spliced replies is
  tokenized piece by piece, at the same boundaries for a prompt and for training.
* A reply whose ids the template renders otherwise (Qwen3 drops the reasoning of earlier
  replies, for example) falls back to its text and is counted in `ids_unusable`.

Loss mask: a text token is trainable when it overlaps a trainable reply span (a token that
straddles the header/reply boundary, like " 5" after "]", carries reply text); every
spliced id of a trainable reply is trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from colocate.data.conversations import Conversation, Turn
from colocate.data.errors import DataError
from colocate.data.template import Renderer, ReplySpan, locate_replies


@dataclass
class Encoded:
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    """Per token: trainable (inside a trainable reply)."""
    ids_used: int = 0
    """Replies spliced in as the target's own token ids."""
    ids_unusable: int = 0
    """Replies with token ids that the template renders as other text (trained as text)."""


def encode_conversation(conversation: Conversation, renderer: Renderer, *,
                        last_assistant_turn_only: bool = False) -> Encoded:
    """Ids and loss mask of the whole conversation; DataError when a reply cannot be located."""
    text, spans = locate_replies(renderer, conversation)
    trainable = {s.turn for s in (spans[-1:] if last_assistant_turn_only else spans)}
    return _encode(conversation, renderer, text, spans, trainable)


def encode_prompt(conversation: Conversation, renderer: Renderer, turn: int) -> list[int]:
    """Ids of the turns before `turn` plus the generation prompt: what the target is given
    to write reply `turn` (earlier replies spliced in as their own ids where they have any)."""
    text, spans = locate_replies(renderer, conversation, num_turns=turn, generation_prompt=True)
    return _encode(conversation, renderer, text, spans, trainable=set()).ids


def _encode(conversation: Conversation, renderer: Renderer, text: str, spans: list[ReplySpan],
            trainable: set[int]) -> Encoded:
    out = Encoded()
    cursor, pending = 0, []  # pending: trainable reply spans inside the current text piece
    for span in spans:
        turn = conversation.turns[span.turn]
        own = _own_ids(turn, text[span.start:span.end], renderer.tokenizer, conversation.where)
        if turn.token_ids is not None:
            out.ids_used += own is not None
            out.ids_unusable += own is None
        if own is None:
            if span.turn in trainable and span.end > span.start:
                pending.append((span.start, span.end))
            continue
        _append_text(out, renderer.tokenizer, text, cursor, span.start, pending,
                     conversation.where)
        out.ids.extend(own)
        out.mask.extend([span.turn in trainable] * len(own))
        cursor, pending = span.end, []
    _append_text(out, renderer.tokenizer, text, cursor, len(text), pending, conversation.where)
    return out


def _own_ids(turn: Turn, span_text: str, tokenizer, where: str) -> list[int] | None:
    """The reply as the target's ids (plus the tokens of any end-of-turn text the ids lack),
    or None when the template renders something else there."""
    if turn.token_ids is None:
        return None
    ids = list(turn.token_ids)
    candidates = [ids]
    if ids and ids[-1] in tokenizer.all_special_ids:
        # A model that stopped on <|endoftext|> where the template writes <|im_end|>.
        candidates.append(ids[:-1])
    for candidate in candidates:
        decoded = tokenizer.decode(candidate, skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
        if span_text.startswith(decoded):
            rest = _tokenize(tokenizer, span_text[len(decoded):], where)["input_ids"]
            return candidate + list(rest)
    return None


def _tokenize(tokenizer, text: str, where: str) -> dict:
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(f"{where}: the tokenizer cannot return offsets; the data pipeline "
                        "needs a fast (tokenizers-backed) tokenizer") from e


def _append_text(out: Encoded, tokenizer, text: str, start: int, end: int,
                 spans: list[tuple[int, int]], where: str) -> None:
    """Tokenize text[start:end] onto `out`, masking tokens that overlap `spans` (absolute
    character positions, ascending)."""
    if end <= start:
        return
    enc = _tokenize(tokenizer, text[start:end], where)
    mask = [False] * len(enc["input_ids"])
    s = 0
    for t, (tok_start, tok_end) in enumerate(enc["offset_mapping"]):
        tok_start, tok_end = tok_start + start, tok_end + start
        while s < len(spans) and tok_start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        mask[t] = max(tok_end, tok_start + 1) > spans[s][0]  # and tok_start < its end
    out.ids.extend(enc["input_ids"])
    out.mask.extend(mask)
