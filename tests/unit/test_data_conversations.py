"""Reading JSONL conversations: both forms, malformed lines, skips."""

from __future__ import annotations

import json
import re

import pytest

from colocate.data import DataError, DataStats, Turn, parse_record, read_conversations


def _write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_openai_and_sharegpt_forms_give_the_same_turns():
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "S"},
                                  {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    a, b = parse_record(openai, "f:1"), parse_record(sharegpt, "f:2")
    assert a.turns == b.turns == (Turn("system", "S"), Turn("user", "Q"), Turn("assistant", "A"))
    assert (a.form, b.form) == ("messages", "conversations")
    assert a.last_assistant_turn_only is None
    override = parse_record({**openai, "last_assistant_turn_only": True}, "f:3")
    assert override.last_assistant_turn_only is True


MALFORMED = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "hi"}', "has neither 'messages' (OpenAI) nor 'conversations' (ShareGPT)"),
    ('{"messages": [], "conversations": []}', "has both"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"content": "x"}]}', "messages[0] has no 'role' field"),
    ('{"conversations": [{"from": "human"}]}', "conversations[0] has no 'value' field"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown from 'bot'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}',
     "messages[1] has unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}], "last_assistant_turn_only": "yes"}',
     "'last_assistant_turn_only' must be true or false"),
]


@pytest.mark.parametrize("line,what", MALFORMED)
def test_malformed_line_names_file_line_problem_and_fix(tmp_path, line, what):
    good = json.dumps({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]})
    path = _write(tmp_path, [good, "", line, good])  # the blank line still counts for LINE
    with pytest.raises(DataError) as info:
        list(read_conversations(path, skip_invalid=False, stats=DataStats()))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert what in message and "data.skip_invalid=true" in message


def test_skip_invalid_counts_and_skips(tmp_path):
    good = json.dumps({"conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}]})
    no_assistant = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    lines = [good] + [line for line, _ in MALFORMED] + ["", "   ", no_assistant,
                                                        '{"messages": []}', good]
    stats = DataStats()
    kept = list(read_conversations(_write(tmp_path, lines), skip_invalid=True, stats=stats))
    assert len(kept) == 2
    assert kept[1].where.endswith(f":{len(lines)}")
    assert stats.lines == len(lines) - 2  # blank and whitespace-only lines are ignored
    assert stats.skipped_invalid == len(MALFORMED)
    assert stats.skipped_no_assistant == 2


@pytest.mark.parametrize("roles, index, why", [
    (["assistant", "user", "assistant"], 0, "the conversation starts with an assistant turn"),
    (["system", "assistant"], 1, "the conversation starts with an assistant turn"),
    (["user", "user", "assistant"], 1, "a second user turn in a row"),
    (["user", "assistant", "assistant"], 2, "a second assistant turn in a row"),
    (["user", "assistant", "system", "user", "assistant"], 2,
     "a system turn after the first turn"),
])
def test_role_order_is_a_named_malformed_line(roles, index, why):
    from colocate.data.errors import RoleOrderError

    record = {"messages": [{"role": r, "content": "x"} for r in roles]}
    with pytest.raises(RoleOrderError, match=re.escape(
            f"f.jsonl:7: role order: messages[{index}]: {why} (roles: {', '.join(roles)})")):
        parse_record(record, "f.jsonl:7")


def test_role_order_accepts_alternation_and_sharegpt_names():
    for roles in (["user", "assistant"], ["system", "user", "assistant", "user"], ["user"]):
        parse_record({"messages": [{"role": r, "content": "x"} for r in roles]}, "f:1")
    parse_record({"conversations": [{"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "a"}]}, "f:1")
