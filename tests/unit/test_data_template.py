"""Chat templates and loss masks: exactly the assistant replies (with their end marker)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from colocate.config import DataSection
from colocate.data import (DataError, Renderer, encode_conversation, load_or_build_tokenized,
                           parse_record, read_conversations, resolve_chat_template)
from colocate.data.stats import DataStats

END = "<|im_end|>"


def tokenize_conversation(conv, tok, template, last_only):
    encoded = encode_conversation(conv, Renderer(tok, template),
                                  last_assistant_turn_only=last_only)
    return encoded.ids, encoded.mask


def _masked_runs(tok, ids, mask) -> list[str]:
    """Decoded text of each contiguous run of trainable tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(int(i))
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_loss_mask_is_exactly_each_reply_and_its_end_token(tiny_assets, tiny_tokenizer):
    template = resolve_chat_template("", tiny_tokenizer, tiny_assets["tokenizer"])
    conversations = list(read_conversations(tiny_assets["data"], skip_invalid=False,
                                            stats=DataStats()))
    multi_turn = 0
    for conv in conversations[:120]:
        ids, mask = tokenize_conversation(conv, tiny_tokenizer, template, False)
        replies = [t.content + END for t in conv.turns if t.role == "assistant"]
        assert _masked_runs(tiny_tokenizer, ids, mask) == replies
        multi_turn += len(replies) > 1
        ids, mask = tokenize_conversation(conv, tiny_tokenizer, template, True)
        assert _masked_runs(tiny_tokenizer, ids, mask) == replies[-1:]
    assert multi_turn > 5


def test_any_prefix_stable_template_masks_correctly(tiny_tokenizer, tmp_path):
    # Plain-text markers (no special tokens), a default system prompt and a trailing blank
    # line: the mask must still be the reply plus its end marker.
    template = ("{{ '[SYS] default\\n' if messages[0]['role'] != 'system' }}"
                "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' </s>\\n\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert resolve_chat_template(str(path), tiny_tokenizer, "tok") == template
    conv = parse_record({"messages": [
        {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Still 5."}]},
        "x:1")
    ids, mask = tokenize_conversation(conv, tiny_tokenizer, template, False)
    # Byte-level BPE glues the header's space to the reply (" 5"): that token is trained.
    assert _masked_runs(tiny_tokenizer, ids, mask) == [" 5 </s>", " Still 5. </s>"]


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    # A template that replaces old replies' content: no mask can find the reply.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ '<|im_start|>assistant\\n(earlier)<|im_end|>\\n' }}{% else %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    conv = parse_record({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "f.jsonl:7")
    with pytest.raises(DataError, match=r"^f\.jsonl:7: cannot locate assistant turn 1 .*"
                                        r"its content is not inside.*data\.chat_template"):
        tokenize_conversation(conv, tiny_tokenizer, template, False)


def test_missing_and_bad_template_settings(tiny_assets):
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    tok.chat_template = None
    with pytest.raises(DataError) as info:
        resolve_chat_template("", tok, "/models/plain")
    assert "/models/plain" in str(info.value) and "data.chat_template" in str(info.value)
    with pytest.raises(DataError, match="data.chat_template: 'no/such/file.jinja'"):
        resolve_chat_template("no/such/file.jinja", tok, "/models/plain")
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(inline, tok, "/models/plain") == inline


def _jsonl(tmp_path, records) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_truncation_and_untrainable_conversations_are_counted(tiny_assets, tiny_tokenizer,
                                                              tmp_path):
    long_prompt = " ".join(["apple banana cherry"] * 30)
    records = [
        {"messages": [{"role": "user", "content": "Count from 1 to 30."},
                      {"role": "assistant", "content": ", ".join(map(str, range(1, 31)))}]},
        {"messages": [{"role": "user", "content": long_prompt},
                      {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
    ]
    cfg = DataSection(path=_jsonl(tmp_path, records), max_length=40, cache_dir=str(tmp_path))
    data = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    s = data.stats
    assert (s.lines, s.conversations, s.truncated) == (4, 2, 1)
    assert (s.skipped_no_trainable, s.skipped_no_assistant, s.skipped_invalid) == (1, 1, 0)
    assert s.lines == (s.conversations + s.skipped_invalid + s.skipped_no_assistant
                       + s.skipped_no_trainable)
    assert int(data.lengths().max()) == 40 and data.num_sequences == 2
    assert s.tokens == data.ids.numel() and s.trainable_tokens == int(data.loss_mask.sum())
    assert "1 truncated" in s.format() and "1 without trainable tokens" in s.format()


def test_sample_override_of_last_turn_only(tiny_assets, tiny_tokenizer, tmp_path):
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    records = [{"messages": turns}, {"messages": turns, "last_assistant_turn_only": True},
               {"messages": turns, "last_assistant_turn_only": False}]
    for global_flag, expected in ((False, [2, 1, 2]), (True, [1, 1, 2])):
        cfg = DataSection(path=_jsonl(tmp_path, records), cache_dir=str(tmp_path),
                          last_assistant_turn_only=global_flag)
        data = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
        runs = [len(_masked_runs(tiny_tokenizer, *data.sequence(i))) for i in range(3)]
        assert runs == expected
        assert data.sequence(0)[0].dtype == torch.int32


def test_template_without_generation_prompt_warns(tiny_assets, tiny_tokenizer, tmp_path, caplog):
    no_prompt = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    records = [{"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hey"}]}]
    cfg = DataSection(path=_jsonl(tmp_path, records), cache_dir=str(tmp_path),
                      chat_template=no_prompt)
    with caplog.at_level("WARNING"):
        load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    assert "ignores add_generation_prompt" in caplog.text


def test_no_usable_conversation_is_an_error(tiny_assets, tiny_tokenizer, tmp_path):
    records = [{"messages": [{"role": "user", "content": "no reply"}]}]
    cfg = DataSection(path=_jsonl(tmp_path, records), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="no usable conversation .*1 without assistant"):
        load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
