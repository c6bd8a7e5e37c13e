"""Templates that are not prefix-stable (Qwen3-style think blocks, DeepSeek-R1-style history
rewriting), reasoning_content, counted skips, and the target's own token ids spliced in."""

from __future__ import annotations

import json

import pytest

from colocate.config import DataSection
from colocate.data import (DataError, Renderer, encode_conversation, encode_prompt,
                           load_or_build_tokenized, parse_record)
from colocate.data.holdout import holdout_lines, read_holdout_conversations
from tests.unit.test_data_template import _masked_runs

END = "<|im_end|>"

# Written for these tests to behave like Qwen3's stock template: reasoning from
# reasoning_content or from a "<think>...</think>" prefix of the content; a think block
# (empty when there is no reasoning) only on replies after the last user turn, and always on
# the last one; with enable_thinking=false the generation prompt carries an empty block.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}{%- set reasoning = '' -%}"
    "{%- if m.get('reasoning_content') is not none -%}{%- set reasoning = m['reasoning_content'] -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}")

# Like DeepSeek-R1's: every reply in history loses its reasoning; the generation prompt opens
# a think block.
R1_STYLE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}")


def masked_runs(tok, encoded) -> list[str]:
    return _masked_runs(tok, encoded.ids, encoded.mask)


def conv(*turns, where="d.jsonl:3"):
    messages = []
    for t in turns:
        role, content, *extra = t
        message = {"role": role, "content": content}
        if extra:
            message.update(extra[0])
        messages.append(message)
    return parse_record({"messages": messages}, where)


MULTI = conv(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5."),
             ("user", "And 4 + 4?"), ("assistant", "4 + 4 = 8."))


def test_qwen3_style_masks_every_reply_and_the_last_think_block(tiny_tokenizer):
    encoded = encode_conversation(MULTI, Renderer(tiny_tokenizer, QWEN3_STYLE))
    # The earlier reply renders without a think block; the last one with the (empty) block
    # the target writes in thinking mode, which the draft must learn too.
    assert masked_runs(tiny_tokenizer, encoded) == [
        "2 + 3 = 5." + END, "<think>\n\n</think>\n\n4 + 4 = 8." + END]
    last_only = encode_conversation(MULTI, Renderer(tiny_tokenizer, QWEN3_STYLE),
                                    last_assistant_turn_only=True)
    assert masked_runs(tiny_tokenizer, last_only) == ["<think>\n\n</think>\n\n4 + 4 = 8." + END]


def test_qwen3_style_without_thinking_keeps_the_prompted_block_out_of_the_mask(tiny_tokenizer):
    renderer = Renderer(tiny_tokenizer, QWEN3_STYLE, {"enable_thinking": False})
    encoded = encode_conversation(MULTI, renderer)
    assert masked_runs(tiny_tokenizer, encoded) == ["2 + 3 = 5." + END, "4 + 4 = 8." + END]
    # A reply whose first characters are also the generation prompt's next ones ("<" of
    # "<think>") keeps them.
    tags = conv(("user", "Bold?"), ("assistant", "<b>5</b>"), ("user", "Again"),
                ("assistant", "<b>6</b>"))
    assert masked_runs(tiny_tokenizer, encode_conversation(tags, renderer)) == [
        "<b>5</b>" + END, "<b>6</b>" + END]


def test_reasoning_content_is_rendered_and_trained(tiny_tokenizer):
    c = conv(("user", "Hi"), ("assistant", "Hello.", {"reasoning_content": "greet back"}))
    encoded = encode_conversation(c, Renderer(tiny_tokenizer, QWEN3_STYLE))
    assert masked_runs(tiny_tokenizer, encoded) == [
        "<think>\ngreet back\n</think>\n\nHello." + END]
    assert c.turns[1].reasoning == "greet back"


def test_r1_style_history_without_reasoning(tiny_tokenizer):
    c = conv(("user", "a?"), ("assistant", "<think>\nhmm\n</think>\n\nb."),
             ("user", "c?"), ("assistant", "<think>\nok\n</think>\n\nd."))
    encoded = encode_conversation(c, Renderer(tiny_tokenizer, R1_STYLE))
    assert masked_runs(tiny_tokenizer, encoded) == ["\n\nb." + END, "\n\nd." + END]


REWRITES = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
            "{{ '<|im_start|>assistant\\n(earlier)<|im_end|>\\n' }}{% else %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _jsonl(tmp_path, records, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_unmaskable_samples_are_counted_skips_not_a_failed_build(tiny_assets, tiny_tokenizer,
                                                                  tmp_path, caplog):
    single = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    starts_with_reply = {"messages": [{"role": "assistant", "content": "x"}]}
    path = _jsonl(tmp_path, [single, multi, single, starts_with_reply])
    # A conversation that starts with a reply is malformed (role order): an invalid line,
    # skipped and counted with data.skip_invalid, not an unmaskable sample.
    cfg = DataSection(path=path, cache_dir=str(tmp_path), chat_template=REWRITES,
                      skip_invalid=True)
    with caplog.at_level("WARNING"):
        data = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    s = data.stats
    assert (s.lines, s.conversations, s.skipped_unmaskable, s.skipped_invalid) == (4, 2, 1, 1)
    assert f"{path}:2: cannot locate assistant turn 1" in caplog.text
    assert f"{path}:4: role order" in caplog.text
    assert "1 unmaskable" in s.format()
    # Nothing usable at all: one error that carries the first reason.
    only = _jsonl(tmp_path, [multi], "only.jsonl")
    with pytest.raises(DataError, match=r"no usable conversation.*first skip: .*only\.jsonl:1"):
        load_or_build_tokenized(DataSection(path=only, cache_dir=str(tmp_path),
                                            chat_template=REWRITES),
                                tiny_tokenizer, tiny_assets["tokenizer"], "")


def _not_round_tripping_ids(tok) -> list[int]:
    """Ids the tokenizer would never produce for their own text (like the tiny target's
    "72 72 72": the text re-tokenizes as other tokens)."""
    for token_id in range(len(tok)):
        ids = [token_id] * 4
        text = tok.decode(ids)
        if text.strip() and "<|" not in text and tok.encode(text) != ids:
            return ids
    raise AssertionError("no such token in this vocabulary")


def test_target_token_ids_are_trained_on_not_the_retokenized_text(tiny_tokenizer):
    tok = tiny_tokenizer
    own = _not_round_tripping_ids(tok) + [tok.convert_tokens_to_ids(END)]
    text = tok.decode(own, skip_special_tokens=True)
    renderer = Renderer(tok, tok.chat_template)
    with_ids = conv(("user", "Say it."), ("assistant", text, {"token_ids": own}))
    as_text = conv(("user", "Say it."), ("assistant", text))
    a, b = encode_conversation(with_ids, renderer), encode_conversation(as_text, renderer)
    trained = [i for i, m in zip(a.ids, a.mask) if m]
    assert trained == own and (a.ids_used, a.ids_unusable) == (1, 0)
    assert [i for i, m in zip(b.ids, b.mask) if m] != own  # the text alone says otherwise
    # The context is the same either way; only the reply's ids differ.
    prompt = encode_prompt(with_ids, renderer, 1)
    assert a.ids[:len(prompt)] == prompt == b.ids[:len(prompt)]
    # Ids truncated by a length limit (no end-of-turn token): the template's marker follows.
    cut = conv(("user", "Say it."), ("assistant", text, {"token_ids": own[:-1]}))
    c = encode_conversation(cut, renderer)
    assert [i for i, m in zip(c.ids, c.mask) if m] == own


def test_prompts_are_the_training_context_of_each_reply(tiny_tokenizer):
    tok = tiny_tokenizer
    odd = _not_round_tripping_ids(tok)
    end = tok.convert_tokens_to_ids(END)
    # The last reply opens with the (empty) think block a Qwen3-style model writes first.
    r1, r2 = odd + [end], tok.encode("<think>\n\n</think>\n\n 7 + 1 = 8.") + [end]
    c = conv(("system", "Be brief."), ("user", "Say it."),
             ("assistant", tok.decode(r1, skip_special_tokens=True), {"token_ids": r1}),
             ("user", "Now add."),
             ("assistant", tok.decode(r2, skip_special_tokens=True), {"token_ids": r2}))
    for renderer in (Renderer(tok, tok.chat_template), Renderer(tok, QWEN3_STYLE)):
        full = encode_conversation(c, renderer)
        assert (full.ids_used, full.ids_unusable) == (2, 0)
        for turn, reply in ((2, r1), (4, r2)):
            prompt = encode_prompt(c, renderer, turn)
            assert full.ids[:len(prompt) + len(reply)] == prompt + reply, (renderer.template, turn)
    # Without thinking, the generation prompt holds an empty think block that history does
    # not: the last reply's context is still exact, an earlier one's header differs.
    no_think = Renderer(tok, QWEN3_STYLE, {"enable_thinking": False})
    r2_plain = tok.encode(" 7 + 1 = 8.") + [end]
    c2 = conv(("user", "Say it."), ("assistant", tok.decode(r1, skip_special_tokens=True),
                                    {"token_ids": r1}), ("user", "Now add."),
              ("assistant", tok.decode(r2_plain, skip_special_tokens=True),
               {"token_ids": r2_plain}))
    full = encode_conversation(c2, no_think)
    assert (full.ids_used, full.ids_unusable) == (2, 0)
    prompt = encode_prompt(c2, no_think, 3)
    assert full.ids[:len(prompt) + len(r2_plain)] == prompt + r2_plain
    assert tok.decode(encode_prompt(c2, no_think, 1)).endswith("<think>\n\n</think>\n\n")


def test_ids_the_template_renders_otherwise_fall_back_to_text(tiny_tokenizer):
    tok = tiny_tokenizer
    reasoning = tok.encode("<think>\nfirst\n</think>\n\nb.") + [tok.convert_tokens_to_ids(END)]
    c = conv(("user", "a?"), ("assistant", tok.decode(reasoning, skip_special_tokens=True),
                              {"token_ids": reasoning}),
             ("user", "c?"), ("assistant", "d."))
    encoded = encode_conversation(c, Renderer(tok, R1_STYLE))
    assert (encoded.ids_used, encoded.ids_unusable) == (0, 1)
    assert masked_runs(tok, encoded) == ["\n\nb." + END, "d." + END]


def test_holdout_split_is_disjoint_deterministic_and_counted(tiny_assets, tiny_tokenizer,
                                                             tmp_path):
    path = tiny_assets["data"]
    held = holdout_lines(path, 48)
    assert len(held) == 48 and held == holdout_lines(path, 48)
    assert holdout_lines(path, 10) <= held  # a smaller split is a subset: stable ranks
    cfg = DataSection(path=path, cache_dir=str(tmp_path), holdout=48)
    train = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "")
    test = load_or_build_tokenized(cfg, tiny_tokenizer, tiny_assets["tokenizer"], "",
                                   split="holdout")
    assert (train.stats.held_out, test.stats.held_out) == (48, 500 - 48)
    assert train.num_sequences + test.num_sequences == 500
    assert train.key != test.key and train.cache_path != test.cache_path
    conversations = read_holdout_conversations(cfg)
    assert sorted(int(c.where.rsplit(":", 1)[1]) for c in conversations) == sorted(held)
    with pytest.raises(DataError, match="data.holdout: 500 held-out conversations leave none"):
        holdout_lines(path, 500)
