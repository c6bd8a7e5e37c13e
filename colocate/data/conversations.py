"""Read JSONL conversations in OpenAI or ShareGPT form into one normalized shape.

Accepted lines (one JSON object each; blank lines are ignored)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}

Either may carry ``"last_assistant_turn_only": true|false``, overriding the run's
``data.last_assistant_turn_only`` for that sample. Everything downstream sees only
``Conversation``: (role, content) turns with roles ``system``, ``user``, ``assistant``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from colocate.data.errors import DataError
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
_MAX_LOGGED_SKIPS = 5


@dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...]
    """(role, content) pairs in order; roles are system, user or assistant."""
    last_assistant_turn_only: bool | None
    """The sample's own override, or None to use data.last_assistant_turn_only."""
    where: str
    """FILE:LINE, for error messages further down the pipeline."""

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages."""
        return [{"role": r, "content": c} for r, c in self.turns]

    @property
    def has_assistant(self) -> bool:
        return any(r == "assistant" for r, _ in self.turns)


def _invalid(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}. Fix the line, or set data.skip_invalid=true to count "
                     "and skip malformed lines")


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
        turns.append((role_map[role], content))
    override = record.get("last_assistant_turn_only")
    if override is not None and not isinstance(override, bool):
        raise _invalid(where, f"'last_assistant_turn_only' must be true or false, got "
                              f"{override!r}")
    return Conversation(tuple(turns), override, where)


def read_conversations(path: str, *, skip_invalid: bool,
                       stats: DataStats) -> Iterator[Conversation]:
    """Yield the conversations of a JSONL file that have an assistant turn.

    Counts into ``stats``: ``lines``, ``skipped_invalid`` and ``skipped_no_assistant``.
    Malformed lines raise DataError unless ``skip_invalid``; then the first few are logged
    so a user can see why data went missing.
    """
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats.lines += 1
            where = f"{path}:{line_no}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _invalid(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
                conversation = parse_record(record, where)
            except DataError as e:
                if not skip_invalid:
                    raise
                stats.skipped_invalid += 1
                if stats.skipped_invalid <= _MAX_LOGGED_SKIPS:
                    log.warning("skipping malformed line: %s", str(e).split(". Fix")[0])
                continue
            if not conversation.has_assistant:
                stats.skipped_no_assistant += 1
                continue
            yield conversation
