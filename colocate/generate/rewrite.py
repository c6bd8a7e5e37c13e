"""One chunk of records regenerated turn by turn, and the counts of what happened to it.

Round r asks the target for the r-th assistant turn of every record in the chunk that has
one (one batched `Generator.generate` call), each prompt built by `encode_prompt` from the
record as regenerated so far: the target answers turn r after ITS OWN earlier replies,
spliced in as their token ids exactly as training will see them. Round r + 1 starts when
round r is done.

A record whose prompt cannot be built (the template fails: `DataError`) or does not fit the
target's context with room for the reply is skipped and counted, with FILE:LINE; so is a
malformed line (with data.skip_invalid). A record without an assistant turn is copied
unchanged: it has nothing to regenerate, and copying keeps one output line per usable
input line (training skips it as it would have skipped the original).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from colocate.data.conversations import FORMS, Conversation, Turn
from colocate.data.encode import encode_prompt
from colocate.data.errors import MAX_LOGGED_SKIPS, DataError
from colocate.data.template import Renderer
from colocate.generate.engines import Generation, Generator

log = logging.getLogger(__name__)
MAX_LISTED_SKIPS = 10
"""Skips listed by FILE:LINE in a part and in the summary (all are counted)."""


@dataclass
class GenerateCounts:
    """Every record read ends in one bucket: ``records_read == records_written +
    skipped_invalid + skipped_template_error + skipped_prompt_too_long``. Turn and token
    counts cover the written records."""

    records_read: int = 0
    """Non-blank input lines handled."""
    records_written: int = 0
    """Output lines: regenerated records plus copies of records without an assistant turn."""
    copied_no_assistant: int = 0
    """Of those, records without an assistant turn, copied unchanged."""
    skipped_invalid: int = 0
    """Malformed lines (data.skip_invalid=true; otherwise they stop the run)."""
    skipped_template_error: int = 0
    """Records whose prompt the chat template cannot render (DataError)."""
    skipped_prompt_too_long: int = 0
    """Records with a prompt longer than the target's context minus max_new_tokens."""
    turns_generated: int = 0
    """Assistant turns written, each the target's own reply."""
    generated_tokens: int = 0
    """Their token ids (stop ids included)."""
    finished_stop: int = 0
    """Turns that ended on a stop id."""
    finished_length: int = 0
    """Turns cut at generate.max_new_tokens."""
    not_round_tripping: int = 0
    """Turns whose decoded text tokenizes to other ids than the target produced (training
    uses the token_ids, which is why they are written)."""
    generate_seconds: float = 0.0
    """Time spent regenerating chunks (summed over resumed runs)."""

    def add(self, other: "GenerateCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GenerateCounts":
        return cls(**values)

    def format(self) -> str:
        rate = self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0
        return (f"{self.records_read:,} records -> {self.records_written:,} written "
                f"({self.copied_no_assistant:,} without assistant turn, copied); skipped: "
                f"{self.skipped_invalid:,} invalid, {self.skipped_template_error:,} template "
                f"errors, {self.skipped_prompt_too_long:,} prompts too long | "
                f"{self.turns_generated:,} turns, {self.generated_tokens:,} tokens "
                f"({rate:,.0f} tok/s), finished: {self.finished_stop:,} stop, "
                f"{self.finished_length:,} length | {self.not_round_tripping:,} turns whose "
                f"text does not round-trip to their token ids")


@dataclass
class ChunkResult:
    first_line: int
    last_line: int
    """The input lines the chunk accounts for (every non-blank one in between)."""
    lines: list[str]
    """Output JSON lines, in input order."""
    counts: GenerateCounts
    skips: list[str]
    """FILE:LINE and reason of the first MAX_LISTED_SKIPS skipped records."""
    written: list[int] = field(default_factory=list)
    """The input line of each of `lines`."""
    truncated_at_context: int = 0
    """Records cut to fit `context_limit` (online decode only)."""


@dataclass
class _Record:
    line_no: int
    conversation: Conversation
    replies: list[Generation] = field(default_factory=list)
    skipped: bool = False
    """Counted as skipped (template error, prompt too long): not written."""
    full: bool = False
    """Filled `context_limit`: its later turns are not regenerated (online decode)."""


def reply_seed(seed: int, line_no: int, turn: int) -> int:
    """A sampling seed that depends on the record and turn only, not on batching."""
    digest = hashlib.sha256(f"colocate-generate:{seed}:{line_no}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def round_trips(tokenizer, ids: list[int], stop_ids: tuple[int, ...]) -> bool:
    """Whether the reply's text (special tokens dropped) tokenizes back to its ids, stop id
    excluded."""
    body = ids[:-1] if ids and ids[-1] in stop_ids else ids
    text = tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"] == list(body)


class ChunkRewriter:
    """Regenerates chunks with one generator, renderer and set of limits (lives for a run).

    `context_limit` (online decode, where the answers are trained on right away): instead of
    skipping a record whose prompt leaves no room for max_new_tokens, each reply is cut so
    prompt + reply fit the limit (the training length), and a record whose next prompt
    already fills it keeps its later turns as they are (training truncates them away); such
    records are counted in ChunkResult.truncated_at_context. Training on the result sees
    the same tokens as training on the uncut answers truncated at the limit."""

    def __init__(self, generator: Generator, renderer: Renderer, *, max_prompt_tokens: int,
                 stop_ids: tuple[int, ...], seed: int,
                 on_batch: Callable[[int, int], None] | None = None,
                 context_limit: int | None = None, max_new_tokens: int = 0):
        self.generator = generator
        self.renderer = renderer
        self.max_prompt_tokens = max_prompt_tokens
        self.context_limit = context_limit
        self.max_new_tokens = max_new_tokens
        assert context_limit is None or max_new_tokens > 0, "context_limit needs max_new_tokens"
        self.stop_ids = stop_ids
        self.seed = seed
        self.on_batch = on_batch
        self._num_logged = 0

    def run(self, items: list[tuple[int, Conversation | DataError]]) -> ChunkResult:
        """Regenerate `items` (line number, parsed line; invalid lines already let through
        by data.skip_invalid) and return their output lines and counts."""
        counts, skips = GenerateCounts(records_read=len(items)), []
        records = []
        for line_no, item in items:
            if isinstance(item, DataError):
                counts.skipped_invalid += 1
                self._note_skip(skips, str(item).split(". Fix")[0], logged=True)
            else:
                records.append(_Record(line_no, item))
        self._truncated: set[int] = set()
        for r in range(max((len(rec.conversation.assistant_turns) for rec in records),
                           default=0)):
            self._round(r, records, counts, skips)
        lines, written = [], []
        for rec in records:
            if rec.skipped:
                continue
            lines.append(json.dumps(self._output(rec, counts), ensure_ascii=False))
            written.append(rec.line_no)
        counts.records_written = len(lines)
        return ChunkResult(items[0][0], items[-1][0], lines, counts, skips, written,
                           len(self._truncated))

    def _round(self, r: int, records: list[_Record], counts: GenerateCounts,
               skips: list[str]) -> None:
        todo, prompts = [], []
        for rec in records:
            turns = rec.conversation.assistant_turns
            if rec.skipped or rec.full or len(turns) <= r:
                continue
            prompt = self._prompt(rec, turns[r], counts, skips)
            if prompt is not None:
                todo.append(rec)
                prompts.append(prompt)
        if not todo:
            return
        seeds = [reply_seed(self.seed, rec.line_no, r) for rec in todo]
        limits = None
        if self.context_limit is not None:
            limits = [min(self.max_new_tokens, self.context_limit - len(p)) for p in prompts]
            self._truncated.update(rec.line_no for rec, n in zip(todo, limits)
                                   if n < self.max_new_tokens)
        replies = self.generator.generate(prompts, seeds, self.on_batch, limits)
        # The Generator contract: one reply per prompt, in order (zip would drop records).
        assert len(replies) == len(prompts), \
            f"{self.generator.name} returned {len(replies)} replies for {len(prompts)} prompts"
        for rec, generation in zip(todo, replies):
            turn = rec.conversation.assistant_turns[r]
            text = self.renderer.tokenizer.decode(generation.ids, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
            turns = list(rec.conversation.turns)
            # The dataset's reasoning_content goes: the reply is what the target wrote.
            turns[turn] = Turn("assistant", text, None, tuple(generation.ids))
            rec.conversation = dataclasses.replace(rec.conversation, turns=tuple(turns))
            rec.replies.append(generation)

    def _prompt(self, rec: _Record, turn: int, counts: GenerateCounts,
                skips: list[str]) -> list[int] | None:
        where = rec.conversation.where
        try:
            prompt = encode_prompt(rec.conversation, self.renderer, turn)
        except DataError as e:
            rec.skipped = True
            counts.skipped_template_error += 1
            self._note_skip(skips, str(e))
            return None
        if self.context_limit is None:
            if len(prompt) <= self.max_prompt_tokens:
                return prompt
            room = (f"at most {self.max_prompt_tokens:,} fit the target's context "
                    "(max_position_embeddings minus generate.max_new_tokens)")
        else:
            if len(prompt) < self.context_limit:
                return prompt
            if rec.replies:  # its earlier replies are trained on; this turn lies past the limit
                rec.full = True
                self._truncated.add(rec.line_no)
                return None
            room = f"a reply needs the prompt under {self.context_limit:,} (the training length)"
        rec.skipped = True
        counts.skipped_prompt_too_long += 1
        self._note_skip(skips, f"{where}: the prompt of assistant turn {turn} has "
                               f"{len(prompt):,} tokens; {room}")
        return None

    def _note_skip(self, skips: list[str], message: str, logged: bool = False) -> None:
        if len(skips) < MAX_LISTED_SKIPS:
            skips.append(message)
        # Malformed lines were logged by the reader (`skip_invalid_line`).
        if not logged and self._num_logged < MAX_LOGGED_SKIPS:
            self._num_logged += 1
            log.warning("skipping: %s", message)

    def _output(self, rec: _Record, counts: GenerateCounts) -> dict:
        """The input record with every assistant turn replaced by the target's reply (its
        turns counted into `counts`)."""
        conversation = rec.conversation
        if not rec.replies:
            counts.copied_no_assistant += 1
            return conversation.record
        content_key = FORMS[conversation.form][1]
        messages = list(conversation.record[conversation.form])
        for index, generation in zip(conversation.assistant_turns, rec.replies):
            message = {k: v for k, v in messages[index].items()
                       if k not in ("reasoning_content", "token_ids")}
            message[content_key] = conversation.turns[index].content
            message["token_ids"] = generation.ids
            messages[index] = message
            counts.turns_generated += 1
            counts.generated_tokens += len(generation.ids)
            counts.finished_stop += generation.finish_reason == "stop"
            counts.finished_length += generation.finish_reason == "length"
            counts.not_round_tripping += not round_trips(self.renderer.tokenizer,
                                                         generation.ids, self.stop_ids)
        return {**conversation.record, conversation.form: messages,
                "generated": {"source_line": rec.line_no,
                              "finish_reasons": [g.finish_reason for g in rec.replies]}}
