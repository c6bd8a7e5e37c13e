"""Read JSONL conversations in OpenAI or ShareGPT form into one normalized shape.

Accepted lines (one JSON object each; blank lines are ignored)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}

Either may carry ``"last_assistant_turn_only": true|false``, overriding the run's
``data.last_assistant_turn_only`` for that sample. A turn may also carry:

* ``"reasoning_content"`` (string): the reasoning of an assistant reply, handed to the chat
  template as reasoning templates (Qwen3, DeepSeek-R1) expect it;
* ``"token_ids"`` (list of ints, assistant turns only): the target's own token ids for the
  reply, as `colocate generate` writes them. Training uses them instead of re-tokenizing
  the text wherever the template renders the reply as the target produced it, because
  decoded text does not always tokenize back to the ids the target emitted.

Everything downstream sees only ``Conversation``: ``Turn``s with roles ``system``, ``user``,
``assistant``, in the order chat templates expect: an optional leading system turn, then
user and assistant alternating, starting with user. Any other order (a first assistant
turn, two user turns in a row, a late system turn) is a ``RoleOrderError``, a malformed
line like the others (skipped and counted with ``data.skip_invalid``): nothing reorders or
merges turns behind the user's back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from colocate.data.errors import MAX_LOGGED_SKIPS, DataError, RoleOrderError
from colocate.data.stats import DataStats

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant"}
# Forms: top-level key -> (role key, content key, role names -> normalized role).
FORMS = {
    "messages": ("role", "content", {r: r for r in ROLES}),
    "conversations": ("from", "value", SHAREGPT_ROLES),
}


@dataclass(frozen=True)
class Turn:
    role: str
    """system, user or assistant."""
    content: str
    reasoning: str | None = None
    """`reasoning_content` of an assistant reply, when the record has one."""
    token_ids: tuple[int, ...] | None = None
    """The target's own ids for this assistant reply (written by `colocate generate`)."""

    def message(self) -> dict[str, str]:
        """The turn as a chat-template message."""
        message = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        return message


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    """The turns in order."""
    last_assistant_turn_only: bool | None
    """The sample's own override, or None to use data.last_assistant_turn_only."""
    where: str
    """FILE:LINE, for error messages further down the pipeline."""
    form: str = "messages"
    """The record's form: "messages" (OpenAI) or "conversations" (ShareGPT)."""
    record: dict = field(default_factory=dict, compare=False, repr=False)
    """The decoded JSON line, so a rewrite (`colocate generate`) keeps every other field."""

    def messages(self, num_turns: int | None = None) -> list[dict[str, str]]:
        """The first `num_turns` turns (all by default) as chat-template messages."""
        return [turn.message() for turn in self.turns[:num_turns]]

    @property
    def has_assistant(self) -> bool:
        return any(turn.role == "assistant" for turn in self.turns)

    @property
    def assistant_turns(self) -> list[int]:
        """Indices of the assistant turns."""
        return [i for i, turn in enumerate(self.turns) if turn.role == "assistant"]


def _invalid(where: str, what: str, kind: type[DataError] = DataError) -> DataError:
    return kind(f"{where}: {what}. Fix the line, or set data.skip_invalid=true to count "
                "and skip malformed lines")


def check_role_order(roles: list[str], form: str, where: str) -> None:
    """Raise RoleOrderError unless `roles` is [system], then user/assistant alternating from
    user (ending with either)."""
    expected = "user"
    for i, role in enumerate(roles):
        if role == "system" and i == 0:
            continue
        if role != expected:
            if role == "system":
                why = "a system turn after the first turn"
            elif i == (1 if roles[0] == "system" else 0):
                why = "the conversation starts with an assistant turn"
            else:
                why = f"a second {role} turn in a row"
            raise _invalid(where, f"role order: {form}[{i}]: {why} (roles: "
                                  f"{', '.join(roles)}); expected an optional system turn "
                                  "first, then user and assistant turns alternating, starting "
                                  "with user", RoleOrderError)
        expected = "assistant" if role == "user" else "user"


def parse_record(record: Any, where: str) -> Conversation:
    """One decoded JSON line -> Conversation; raises DataError naming ``where``."""
    if not isinstance(record, dict):
        raise _invalid(where, f"expected a JSON object, got {type(record).__name__}")
    present = [k for k in FORMS if k in record]
    if len(present) != 1:
        what = ("has both 'messages' and 'conversations'" if present else
                f"has neither 'messages' (OpenAI) nor 'conversations' (ShareGPT); keys: "
                f"{sorted(record)}")
        raise _invalid(where, what)
    form = present[0]
    role_key, content_key, role_map = FORMS[form]
    raw_turns = record[form]
    if not isinstance(raw_turns, list):
        raise _invalid(where, f"'{form}' must be a list, got {type(raw_turns).__name__}")
    turns = []
    for i, turn in enumerate(raw_turns):
        at = f"{form}[{i}]"
        if not isinstance(turn, dict):
            raise _invalid(where, f"{at} must be an object, got {type(turn).__name__}")
        for key in (role_key, content_key):
            if key not in turn:
                raise _invalid(where, f"{at} has no '{key}' field")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role not in role_map:
            raise _invalid(where, f"{at} has unknown {role_key} {role!r}; use one of "
                                  f"{', '.join(role_map)}")
        if not isinstance(content, str):
            raise _invalid(where, f"{at}.{content_key} must be a string, got "
                                  f"{type(content).__name__}")
        turns.append(Turn(role_map[role], content, _reasoning(turn, at, where),
                          _token_ids(turn, role_map[role], at, where)))
    check_role_order([turn.role for turn in turns], form, where)
    override = record.get("last_assistant_turn_only")
    if override is not None and not isinstance(override, bool):
        raise _invalid(where, f"'last_assistant_turn_only' must be true or false, got "
                              f"{override!r}")
    return Conversation(tuple(turns), override, where, form, record)


def _reasoning(turn: dict, at: str, where: str) -> str | None:
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise _invalid(where, f"{at}.reasoning_content must be a string, got "
                              f"{type(reasoning).__name__}")
    return reasoning


def _token_ids(turn: dict, role: str, at: str, where: str) -> tuple[int, ...] | None:
    ids = turn.get("token_ids")
    if ids is None:
        return None
    if role != "assistant":
        raise _invalid(where, f"{at} has token_ids but is a {role} turn; only assistant replies "
                              "carry the target's token ids")
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise _invalid(where, f"{at}.token_ids must be a list of non-negative integers")
    return tuple(ids)


def read_lines(path: str, *, stats: DataStats,
               keep_line: Callable[[int], bool] | None = None,
               ) -> Iterator[tuple[int, Conversation | DataError]]:
    """Yield (line number, Conversation or the DataError saying why the line is not one) for
    every non-blank line `keep_line` accepts (all by default), with or without an assistant
    turn. The one parser of the format: `read_conversations` (training) and `colocate
    generate` (which must account for every line it does not rewrite) both read through it.

    Counts into ``stats``: ``lines`` and ``held_out`` (lines `keep_line` rejects).
    """
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats.lines += 1
            if keep_line is not None and not keep_line(line_no):
                stats.held_out += 1
                continue
            where = f"{path}:{line_no}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _invalid(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
                item = parse_record(record, where)
            except DataError as e:
                item = e
            yield line_no, item


def skip_invalid_line(error: DataError, *, skip_invalid: bool, stats: DataStats) -> None:
    """A malformed line: raise unless ``skip_invalid``; else count it and log the first few,
    so a user can see why data went missing."""
    if not skip_invalid:
        raise error
    stats.skipped_invalid += 1
    if stats.skipped_invalid <= MAX_LOGGED_SKIPS:
        log.warning("skipping malformed line: %s", str(error).split(". Fix")[0])


def read_conversations(path: str, *, skip_invalid: bool, stats: DataStats,
                       keep_line: Callable[[int], bool] | None = None,
                       ) -> Iterator[Conversation]:
    """Yield the conversations of a JSONL file that have an assistant turn.

    Counts into ``stats``: ``lines``, ``held_out`` (lines `keep_line` rejects: the split
    that is not being read), ``skipped_invalid`` and ``skipped_no_assistant``. Malformed
    lines raise DataError unless ``skip_invalid`` (see `skip_invalid_line`).
    """
    for _, item in read_lines(path, stats=stats, keep_line=keep_line):
        if isinstance(item, DataError):
            skip_invalid_line(item, skip_invalid=skip_invalid, stats=stats)
            continue
        if not item.has_assistant:
            stats.skipped_no_assistant += 1
            continue
        yield item
